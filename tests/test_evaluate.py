"""Evaluation: log-likelihoods against transformers, metrics against sacrebleu and rouge-score, task files,
the lm-evaluation-harness adapter against our own harness, and the real model above chance."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import sparkgpt
from sparkgpt.cli import main
from sparkgpt.errors import SparkGPTError
from sparkgpt.evaluate import metrics
from sparkgpt.evaluate.harness import evaluate
from sparkgpt.evaluate.loglik import encode_pair, score_batch, score_continuations, score_text
from sparkgpt.evaluate.task import bundled_tasks, load_task

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(hf_llama):
    reference, directory = hf_llama
    return reference, sparkgpt.load(directory, device="cpu")


def reference_logprob(model, ids: list[int], first_target: int) -> float:
    """log p(ids[first_target:] | ids[:first_target]) from one transformers forward pass over the whole text."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(first_target, len(ids)))


def test_continuation_scores_equal_transformers_with_and_without_prefix_reuse(tiny):
    reference, lm = tiny
    context = lm.tokenizer.encode("The quick brown fox jumps over the")
    continuations = [lm.tokenizer.encode(w) for w in [" lazy dog", " moon", " 你好 🙂 and more words"]]
    shared = score_continuations(lm.model, context, continuations)
    for continuation, score in zip(continuations, shared, strict=True):
        expected = reference_logprob(reference, context + continuation, len(context))
        alone = score_continuations(lm.model, context, [continuation])[0]
        assert math.isclose(score.logprob, expected, abs_tol=1e-4)
        assert math.isclose(alone.logprob, expected, abs_tol=1e-4)
        with torch.no_grad():  # and the direct sum of our own full forward's token log-probabilities
            logprobs = torch.log_softmax(lm.model(torch.tensor([context + continuation]))[0], dim=-1)
        direct = sum(float(logprobs[t - 1, tok]) for t, tok in enumerate(context + continuation) if t >= len(context))
        assert math.isclose(score.logprob, direct, abs_tol=1e-4)
        assert score.n_tokens == len(continuation)


def test_greedy_flag_matches_the_argmax_continuation(tiny):
    _, lm = tiny
    context = lm.tokenizer.encode("To be, or not")
    greedy = lm.complete([context], max_new_tokens=3, temperature=0)[0].token_ids
    other = [(greedy[0] + 1) % lm.config.vocab_size, *greedy[1:]]
    assert [s.is_greedy for s in score_continuations(lm.model, context, [greedy, other])] == [True, False]


def test_rolling_text_score_equals_transformers_window_by_window(tiny):
    reference, lm = tiny
    ids = lm.tokenizer.encode("To be, or not to be, that is the question. " * 4)
    start = lm.tokenizer.eos_token_id
    window = 16
    expected = 0.0
    full = [start, *ids]
    for begin in range(0, len(ids), window):
        piece = full[begin:begin + window + 1]
        expected += reference_logprob(reference, piece, 1)
    assert math.isclose(score_text(lm.model, ids, start, window=window), expected, abs_tol=1e-3)


def test_encode_pair_moves_the_context_trailing_space_into_the_continuation(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "Sentiment: ", "positive")
    assert tokenizer.decode(context_ids) == "Sentiment:"
    assert tokenizer.decode(continuation_ids) == " positive"


def test_generation_metrics_equal_sacrebleu_and_rouge_score():
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    predictions = ["le chat dort sur le canapé", "il pleut beaucoup aujourd'hui", "bonjour"]
    references = [["le chat dort sur le canapé"], ["il pleut fort aujourd'hui"], ["bonsoir"]]
    streams = [[r[0] for r in references]]
    assert metrics.bleu(predictions, references) == sacrebleu.corpus_bleu(predictions, streams).score
    assert metrics.chrf(predictions, references) == sacrebleu.corpus_chrf(predictions, streams).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for kind in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(scorer.score(r[0], p)[kind].fmeasure for p, r in zip(predictions, references,
                                                                                  strict=True)) / 3
        assert math.isclose(metrics.GENERATION_METRICS[kind](predictions, references), expected)


def test_a_task_names_its_bleu_tokenizer_and_chinese_splits_characters_as_sacrebleu_zh(tiny, monkeypatch):
    sacrebleu = pytest.importorskip("sacrebleu")
    prediction, reference = "我把伞落在公交车上了。", "我在公交车上把伞弄丢了。"
    assert metrics.bleu([prediction], [[reference]]) == 0.0  # 13a: a sentence without spaces is one word
    by_character = metrics.bleu([prediction], [[reference]], tokenize="zh")
    assert by_character == sacrebleu.corpus_bleu([prediction], [[reference]], tokenize="zh").score > 40
    assert (load_task("translation_en_zh").bleu_tokenize, load_task("translation_en_es").bleu_tokenize) == ("zh",
                                                                                                          "13a")
    seen = []
    monkeypatch.setitem(metrics.GENERATION_METRICS, "bleu", lambda p, r, **options: seen.append(options) or 0.0)
    evaluate(tiny[1], "translation_en_zh", limit=1, progress=False)
    assert seen == [{"tokenize": "zh"}]


def test_squad_normalisation_and_scores():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.normalize_answer("an apple, a pear & THE plum.") == "apple pear plum"
    assert metrics.exact_match(["the Eiffel tower."], [["Eiffel Tower"]]) == 100.0
    assert metrics.exact_match(["Paris"], [["London", "paris"]]) == 100.0  # the best of several references
    # SQuAD's F1: overlap 2 of 3 predicted and 2 of 2 gold tokens -> P=2/3, R=1, F1=0.8
    assert math.isclose(metrics.f1(["the big red balloon"], [["red balloon"]]), 80.0)
    assert metrics.f1(["nothing"], [["something else"]]) == 0.0


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("files, message", [
    ({"t.yaml": "kind: multiple_choice\nprompt: '{text}'\nchoices: [a, b]\nanswer: label\nitems: [{text: x}]\n"},
     "t.yaml: item 1: item has no answer field 'label'"),
    ({"t.yaml": "prompt: '{text}'\nchoices: [a, b]\nanswer: label\ndata: d.jsonl\n",
      "d.jsonl": '{"text": "x", "label": "a"}\n{"text": "y", "label": "c"}\n'},
     "d.jsonl:2: answer 'c' is not one of the choices ['a', 'b']"),
    ({"t.yaml": "prompt: '{text} {missing}'\nchoices: [a, b]\nanswer: label\ndata: d.jsonl\n",
      "d.jsonl": '{"text": "x", "label": "a"}\n'}, "d.jsonl:1: item has no field 'missing'"),
    ({"t.yaml": "prompt: '{text}'\nchoices: [a, b]\nanswer: label\ndata: d.jsonl\n",
      "d.jsonl": '{"text": "x", "label": "a"}\n{"text": oops}\n'}, "d.jsonl:2: not valid JSON"),
    ({"t.yaml": "kind: ranking\n"}, "t.yaml: kind 'ranking' is not one of"),
    ({"t.yaml": "promt: x\n"}, "t.yaml: unknown task field(s) promt"),
    ({"t.yaml": "kind: generation\nmetrics: [bleurt]\nitems: [{prompt: x, answer: y}]\n"},
     "t.yaml: unknown metric(s) bleurt"),
    ({"t.yaml": "kind: generation\nbleu_tokenize: moses\nitems: [{prompt: x, answer: y}]\n"},
     "t.yaml: bleu_tokenize 'moses' is not one of 13a, intl, zh"),
    ({"t.yaml": "kind: generation\nitems: [{prompt: x, answer: 3}]\n"},
     "t.yaml: item 1: answer must be a string or a non-empty list of strings"),
    ({"t.yaml": "a: [unclosed\n"}, "t.yaml: not readable YAML"),
])
def test_malformed_task_files_name_the_file_and_item(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(SparkGPTError) as error:
        load_task(tmp_path / "t.yaml")
    assert message in str(error.value)


def test_every_bundled_task_loads_with_few_shot_examples():
    assert set(bundled_tasks()) == {"sentiment", "topic", "intent", "reading_qa", "translation_en_fr",
                                    "translation_en_es", "translation_en_de", "translation_en_zh",
                                    "translation_fr_en", "translation_es_en", "translation_de_en",
                                    "translation_zh_en", "summarization", "keywords", "correction",
                                    "open_domain_qa", "kg_qa", "easy-vqa"}
    for name in bundled_tasks():
        if name == "easy-vqa" and importlib.util.find_spec("easy_vqa") is None:
            continue  # its images come from the easy-vqa package (a dev extra)
        task = load_task(name)
        assert len(task.items) >= 50, name
        if task.kind != "image_qa":  # questions about images are answered zero-shot
            assert len(task.fewshot_items) >= 3, name


def test_evaluate_command_prints_a_table_and_writes_a_report(hf_llama, tmp_path, capsys):
    task = write(tmp_path / "mc.jsonl", "\n".join(json.dumps({"prompt": f"Q{i}: 2+2=", "choices": ["4", "5"],
                                                              "answer": 0}) for i in range(4)))
    assert main(["evaluate", str(hf_llama[1]), "--task", str(task), "--out", str(tmp_path / "r.json"),
                 "--device", "cpu"]) == 0
    assert "accuracy" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_items"] == 4 and len(report["samples"]) == 4 and "accuracy_norm" in report["metrics"]


def test_perplexity_task_equals_the_rolling_score(hf_llama, tmp_path):
    lm = sparkgpt.load(hf_llama[1], device="cpu")
    text = "To be, or not to be, that is the question. 你好"
    report = evaluate(lm, write(tmp_path / "held_out.txt", text), progress=False)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    total = score_text(lm.model, ids, lm.tokenizer.eos_token_id)
    assert math.isclose(report.metrics["perplexity"], math.exp(-total / len(ids)))
    assert math.isclose(report.metrics["bits_per_byte"], -total / math.log(2) / len(text.encode()))


LM_EVAL_TASK = """task: local_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: "{{{{['negative', 'positive'].index(label)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_lm_eval_through_our_adapter_equals_our_harness(hf_llama, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from sparkgpt.evaluate.lm_eval_adapter import SparkGPTHarnessModel

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    reviews = ["Great film, loved it.", "Terrible service and cold food.", "A masterpiece!", "Boring and too long.",
               "I would buy it again.", "Broke after one day.", "Charming and funny.", "Never again."]
    items = [{"text": t, "label": "positive" if i % 2 == 0 else "negative", "split": "test"}
             for i, t in enumerate(reviews)]
    data = write(tmp_path / "reviews.jsonl", "\n".join(json.dumps(item) for item in items) + "\n")
    write(tmp_path / "local_sentiment.yaml", LM_EVAL_TASK.format(data=data))
    ours_task = write(tmp_path / "ours.yaml", "prompt: 'Review: {text}\\nSentiment:'\nchoices: [negative, positive]\n"
                                              f"answer: label\ndata: {data}\n")
    model = SparkGPTHarnessModel(ref=str(hf_llama[1]))
    results = lm_eval.simple_evaluate(model=model, tasks=["local_sentiment"],
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    theirs = results["results"]["local_sentiment"]
    ours = evaluate(model.lm, ours_task, chat=False, progress=False).metrics
    assert math.isclose(theirs["acc,none"] * 100, ours["accuracy"])
    assert math.isclose(theirs["acc_norm,none"] * 100, ours["accuracy_norm"])


@pytest.mark.slow
def test_real_model_zero_shot_sentiment_is_clearly_above_chance(smollm2_gguf):
    lm = sparkgpt.load(smollm2_gguf, device="cpu")
    report = evaluate(lm, "sentiment", shots=0, progress=False)
    assert report.metrics["accuracy"] >= 75.0  # chance is 50; measured 86 on the 50 test items


def test_batched_requests_of_ragged_contexts_equal_transformers(tiny):
    reference, lm = tiny
    encode = lm.tokenizer.encode
    requests = [
        (encode("The quick brown fox jumps over the"), [encode(" lazy dog"), encode(" moon")]),
        (encode("A"), [encode(" b c d"), encode(" 你好")]),  # one token of context: nothing to prefill
        (encode("To be, or not to be, that is the question: whether"), [encode(" 'tis nobler")]),
    ]
    scored = score_batch(lm.model, requests)
    for (context, continuations), scores in zip(requests, scored, strict=True):
        for continuation, score in zip(continuations, scores, strict=True):
            expected = reference_logprob(reference, context + continuation, len(context))
            assert math.isclose(score.logprob, expected, abs_tol=1e-4)


def full_forward_logprob(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one plain forward of the model over the whole text, no cache."""
    ids = context + continuation
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(len(context), len(ids)))


@pytest.mark.parametrize("patterns", [None, ["dense", "local"], ["local", "dense", "local"],
                                      ["local", "strided", "fixed"]],
                         ids=["dense", "dense-local", "local-dense-local", "local-strided-fixed"])
def test_multiple_choice_batch_equals_each_choice_scored_alone(patterns):
    """Several items with several choices each, through the shared-prefix batch (the prefix cache copied once per
    choice), equal a full forward per (context, choice); local layers' window (5) is shorter than the contexts
    and the choices, so their ring wraps in both passes, and ragged contexts leave padding in it."""
    torch.manual_seed(0)
    config = sparkgpt.preset("tiny-llama", n_layers=3, attention_patterns=patterns, attention_window=5)
    model = sparkgpt.model.GPT(config).eval()
    vocab = config.vocab_size

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,)).tolist()

    requests = [
        (ids(13), [ids(1), ids(7), ids(3)]),
        (ids(1), [ids(4), ids(9)]),  # one token of context: nothing to prefill for this item
        (ids(4), [ids(2), ids(6), ids(11), ids(1)]),
        (ids(21), [ids(8), ids(3)]),
    ]
    # As many choices as items, but not one per item (an item without choices): the rows still need reordering.
    uneven = [(ids(9), [ids(6), ids(2)]), (ids(17), []), (ids(12), [ids(7)])]
    for batch in (requests, uneven):
        scored = score_batch(model, batch)
        for (context, continuations), scores in zip(batch, scored, strict=True):
            assert len(scores) == len(continuations)
            for continuation, score in zip(continuations, scores, strict=True):
                expected = full_forward_logprob(model, context, continuation)
                assert math.isclose(score.logprob, expected, abs_tol=1e-4), (score.logprob, expected)
                assert score.n_tokens == len(continuation)
    context, continuations = requests[2]  # the one-item path agrees too
    for continuation, score in zip(continuations, score_continuations(model, context, continuations), strict=True):
        assert math.isclose(score.logprob, full_forward_logprob(model, context, continuation), abs_tol=1e-4)


def test_the_reverse_translation_tasks_read_the_same_pairs_the_other_way():
    for code, name in (("es", "Spanish"), ("de", "German"), ("zh", "Chinese")):
        forward, reverse = load_task(f"translation_en_{code}"), load_task(f"translation_{code}_en")
        assert len(reverse.items) == len(forward.items) >= 50 and len(reverse.fewshot_items) >= 3
        item = reverse.items[0]
        assert reverse.render(item) == f"{name}: {forward.gold_answers(item)[0]}\nEnglish:"
        assert reverse.gold_answers(item) == [item.fields["source"]]
        assert reverse.bleu_tokenize == "13a"  # the output is English
