"""Classification that chooses its prompt: a chat model's label scored as the assistant's reply under its chat
template (checked against transformers' rendering and logits), the format chosen by leave-one-out accuracy when
labelled examples are given and reported, the same for multiple-choice evaluation, and the real SmolLM2 on
reviews written here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import AddedToken

import sparkgpt
from sparkgpt.cli import main
from sparkgpt.errors import SparkGPTError
from sparkgpt.evaluate import harness
from sparkgpt.tasks import prompted
from sparkgpt.tasks.prompted import build_prompt, choose_format, classify, classify_many
from tests.conftest import save_hf_model, train_byte_bpe

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LABELS = ["sunny", "rainy", "windy"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random transformers Llama with a ChatML tokenizer: (transformers model, its tokenizer, our LM)."""
    tokenizer = train_byte_bpe()
    tokenizer.backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                          for t in ("<|im_start|>", "<|im_end|>")])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    directory = save_hf_model(model, tokenizer, tmp_path_factory.mktemp("chat-llama"))
    return model, transformers.AutoTokenizer.from_pretrained(directory), sparkgpt.load(directory, device="cpu")


@pytest.fixture(scope="module")
def chat_directory(chat_model):
    return chat_model[1].name_or_path


@pytest.fixture(scope="module")
def plain_lm(hf_llama):
    return sparkgpt.load(hf_llama[1], device="cpu")


def request(lm, text: str) -> str:
    """The user's turn: the classify prompt as text."""
    return build_prompt(lm, "classify", {"text": text, "labels": ", ".join(LABELS)}, chat=False)


def test_chat_label_is_the_assistants_reply_as_transformers_renders_it(chat_model, monkeypatch):
    model, theirs, lm = chat_model
    scored = []
    real = prompted.score_batch
    monkeypatch.setattr(prompted, "score_batch", lambda m, requests: scored.extend(requests) or real(m, requests))
    probabilities = classify(lm, "Clouds all day, then a downpour.", LABELS, chat=True, calibrate=False)

    (context, continuations), = scored
    user = [{"role": "user", "content": request(lm, "Clouds all day, then a downpour.")}]
    assert context == theirs.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
    means = []
    for label, continuation in zip(LABELS, continuations, strict=True):
        rendered = theirs.apply_chat_template([*user, {"role": "assistant", "content": label}], tokenize=False)
        reply = rendered[:rendered.rindex("<|im_end|>") + len("<|im_end|>")]  # the turn, up to its end token
        assert theirs.decode(context + continuation) == reply
        assert context + continuation == theirs(reply, add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([context + continuation])).logits[0], dim=-1)
        means.append(sum(float(logprobs[len(context) + i - 1, t]) for i, t in enumerate(continuation))
                     / len(continuation))
    weights = [math.exp(m) for m in means]
    for label, weight in zip(LABELS, weights, strict=True):
        assert math.isclose(probabilities[label], weight / sum(weights), abs_tol=1e-5)


def test_without_labelled_examples_the_default_is_the_plain_prompt_calibrated(chat_model, plain_lm):
    result = classify(chat_model[2], "A calm blue sky.", LABELS)
    assert (result.choice.chat, result.choice.calibrate, result.choice.accuracy) == (False, True, {})
    assert "default" in result.choice.reason and result.choice.name == "plain, calibrated"
    assert math.isclose(sum(result.values()), 1.0, abs_tol=1e-6)
    assert classify(plain_lm, "A calm blue sky.", LABELS).choice.name == "plain, calibrated"
    assert classify(chat_model[2], "x", LABELS, chat=True, calibrate=False).choice.reason == "given"
    assert classify(chat_model[2], "x", LABELS, chat=True).choice.name == "chat, uncalibrated"
    with pytest.raises(SparkGPTError, match="no chat template"):
        classify(plain_lm, "x", LABELS, chat=True)


EXAMPLES = [("hot and bright", "sunny"), ("drizzle since dawn", "rainy"), ("gusts bent the trees", "windy"),
            ("clear skies", "sunny"), ("puddles everywhere", "rainy"), ("kites flew high", "windy")]
GOLD = dict(EXAMPLES)


def scripted_probabilities(seen: list):
    """Label probabilities for a constructed case: the plain prompt leans towards "sunny", and so does its
    content-free input, so calibration removes the lean; the chat prompt always says "windy"."""
    def label_probabilities(lm, requests, labels, chat, batch_size):
        seen.append((chat, [(text, [fields["text"] for fields, _ in shown]) for text, shown in requests]))
        rows = []
        for text, _ in requests:
            if chat:
                weights = [1.0, 1.0, 3.0]
            elif text == "N/A":
                weights = [3.0, 1.0, 1.0]
            else:
                weights = [(1.0 if label == GOLD[text] else 0.2) + (1.1 if label == "sunny" else 0.0)
                           for label in labels]
            rows.append([w / sum(weights) for w in weights])
        return rows
    return label_probabilities


def test_leave_one_out_picks_the_format_that_is_right_and_reports_it(chat_model, monkeypatch):
    lm = chat_model[2]
    seen = []
    monkeypatch.setattr(prompted, "_label_probabilities", scripted_probabilities(seen))
    choice = choose_format(lm, LABELS, examples=EXAMPLES)
    assert (choice.chat, choice.calibrate, choice.name) == (False, True, "plain, calibrated")
    assert choice.accuracy == {"chat, calibrated": 1 / 3, "chat, uncalibrated": 1 / 3,
                               "plain, calibrated": 1.0, "plain, uncalibrated": 2 / 6}
    assert "leave-one-out" in choice.reason
    # One scoring pass per format serves both calibrations; each example is scored with the others shown,
    # and each fold's content-free input once.
    assert [chat for chat, _ in seen] == [False, True]
    for _, requests in seen:
        texts = [text for text, _ in requests]
        assert texts == [t for text, _ in EXAMPLES for t in (text, "N/A")]
        for text, shown in requests[::2]:
            assert shown == [t for t, _ in EXAMPLES if t != text]


def test_a_dev_set_is_scored_with_every_example_shown_and_the_choice_travels_with_the_result(chat_model,
                                                                                            monkeypatch):
    lm = chat_model[2]
    seen = []
    monkeypatch.setattr(prompted, "_label_probabilities", scripted_probabilities(seen))
    results = classify_many(lm, ["hot and bright"], LABELS, examples=EXAMPLES[:2], dev=EXAMPLES[2:])
    assert results[0].choice.name == "plain, calibrated"
    dev_fold = [(text, shown) for _, requests in seen[:2] for text, shown in requests if text in dict(EXAMPLES[2:])]
    assert all(shown == [t for t, _ in EXAMPLES[:2]] for _, shown in dev_fold) and len(dev_fold) == 2 * 4
    assert max(results[0], key=results[0].get) == "sunny"


def test_labels_of_examples_must_be_among_the_labels(chat_model):
    with pytest.raises(SparkGPTError, match="'hail'"):
        choose_format(chat_model[2], LABELS, dev=[("ice from the sky", "hail")])


def weather_task(directory, items: list[tuple[str, str, str]]):
    data = directory / "weather.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": label, "split": split}) + "\n"
                            for t, label, split in items), encoding="utf-8")
    task = directory / "weather.yaml"
    task.write_text(f"prompt: \"Sky: {{text}}\\nWeather:\"\nchoices: [sunny, rainy, windy]\nanswer: label\n"
                    f"data: {data}\n", encoding="utf-8")
    return task


def test_multiple_choice_scores_the_choice_as_the_reply_with_the_template_and_as_text_without(
        chat_model, chat_directory, tmp_path, monkeypatch):
    _, theirs, lm = chat_model
    task = weather_task(tmp_path, [("gusts all night", "windy", "test")])
    scored = []
    real = harness.score_batch
    monkeypatch.setattr(harness, "score_batch", lambda m, requests: scored.extend(requests) or real(m, requests))
    assert main(["evaluate", chat_directory, "--task", str(task), "--chat-template", "on", "--device", "cpu"]) == 0
    (context, continuations), = scored
    assert [theirs.decode(c) for c in continuations] == [f"{label}<|im_end|>" for label in LABELS]
    assert theirs.decode(context) == ("<|im_start|>user\nSky: gusts all night\nWeather:<|im_end|>\n"
                                      "<|im_start|>assistant\n")

    scored.clear()
    report = harness.evaluate(lm, task, progress=False)  # auto, with no few-shot items to choose on: plain text
    assert (report.chat_template, report.format_accuracy) == (False, {})
    (context, continuations), = scored
    assert [theirs.decode(c) for c in continuations] == [f" {label}" for label in LABELS]
    assert theirs.decode(context) == "Sky: gusts all night\nWeather:"


def test_auto_chooses_the_template_by_leave_one_out_on_the_few_shot_items_and_says_so(chat_model, tmp_path):
    lm = chat_model[2]
    train = [("blazing sun", "sunny", "train"), ("steady rain", "rainy", "train"), ("a gale", "windy", "train"),
             ("not a cloud", "sunny", "train")]
    task = weather_task(tmp_path, [*train, ("gusts all night", "windy", "test")])
    report = harness.evaluate(lm, task, shots=1, progress=False)
    plain = harness.evaluate(lm, task, shots=1, chat=False, progress=False)
    assert set(report.format_accuracy) == {"plain", "chat"}
    assert report.chat_template == (report.format_accuracy["chat"] > report.format_accuracy["plain"])
    assert "chosen by leave-one-out accuracy on the few-shot items" in report.table()
    assert plain.format_accuracy == {} and not plain.chat_template


# Reviews written for this test, of things the bundled sets do not review: half positive, half negative.
REVIEWS = [
    ("The blender crushed ice in seconds and it is quieter than my old one.", "positive"),
    ("We sat for an hour before anyone took our order, and the pasta was mushy.", "negative"),
    ("I laughed from the opening scene to the credits.", "positive"),
    ("The laptop lid cracked after a fortnight and the seller ignored my emails.", "negative"),
    ("Clean rooms, a generous breakfast and staff who remembered our names.", "positive"),
    ("The plot goes nowhere and the dialogue is painfully wooden.", "negative"),
    ("These running shoes feel like clouds, even after ten miles.", "positive"),
    ("Since the last update the banking app logs me out every few seconds.", "negative"),
    ("A gripping novel; I stayed up until three to finish it.", "positive"),
    ("Overpriced, underseasoned and served on a sticky table.", "negative"),
    ("The tour guide was funny and knew every story behind the old town.", "positive"),
    ("My package arrived two weeks late and the box was crushed.", "negative"),
    ("Out of the box and on the wall in five minutes; the colours on this TV are gorgeous.", "positive"),
    ("The battery dies before lunch, which makes the phone useless to me.", "negative"),
    ("Best pizza crust I have had outside Naples.", "positive"),
    ("The sequel ruins everything that made the first film charming.", "negative"),
    ("My kids play this board game every weekend and still beg for more.", "positive"),
    ("Within a month the office chair wobbled and squeaked whenever I leaned back.", "negative"),
    ("Friendly mechanic, fair price, and the car runs better than ever.", "positive"),
    ("The concert sound was muddy and we could barely hear the singer.", "negative"),
    ("This little notebook has sturdy pages that take fountain pen ink without bleeding.", "positive"),
    ("I waited forty minutes on hold only to be disconnected.", "negative"),
    ("The museum's new wing is breathtaking; plan a whole afternoon.", "positive"),
    ("The bookshelf came without instructions and two of the bolts were the wrong size.", "negative"),
    ("Warm, cozy cafe with the best cinnamon rolls in town.", "positive"),
    ("The game is full of bugs and the servers are down every evening.", "negative"),
    ("The headphones block out the train noise completely. Worth every penny.", "positive"),
    ("Our room reeked of cigarettes and the shower only ran cold.", "negative"),
    ("Her second album is even better than the first.", "positive"),
    ("I returned the jacket because the zipper jammed on day one.", "negative"),
    ("Our plumber arrived on time, explained everything, and cleaned up after himself.", "positive"),
    ("The course videos are outdated and the quizzes test things never taught.", "negative"),
    ("Lovely garden hose: no kinks, no leaks, easy to coil.", "positive"),
    ("The salad was wilted and the chicken was dry as cardboard.", "negative"),
    ("The documentary made me see my own city with new eyes.", "positive"),
    ("The printer jams on every third page and the ink costs a fortune.", "negative"),
    ("A thoughtful, beautifully acted drama that stays with you.", "positive"),
    ("The gym is always crowded and half the machines are broken.", "negative"),
    ("The vacuum picks up dog hair from the rug on the first pass.", "positive"),
    ("Flight delayed six hours and the airline offered nothing, not even water.", "negative"),
]


def transformers_chat_accuracy(model, tokenizer, lm, labels: list[str]) -> float:
    """The reference: each label as the assistant's reply under the chat template, the prediction the label whose
    tokens have the highest summed log-probability (the rows right-padded, 16 to a forward pass)."""
    rows = []  # (the conversation's token ids up to the end of the label, where the label starts)
    for text, _ in REVIEWS:
        content = build_prompt(lm, "classify", {"text": text, "labels": ", ".join(labels)}, chat=False)
        user = [{"role": "user", "content": content}]
        start = len(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False))
        for label in labels:
            ids = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": label}], tokenize=True,
                                                return_dict=False)
            rows.append((ids[:start + len(tokenizer(label, add_special_tokens=False).input_ids)], start))
    sums = []
    for first in range(0, len(rows), 16):
        chunk = rows[first:first + 16]
        width = max(len(ids) for ids, _ in chunk)
        inputs = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(inputs, attention_mask=mask).logits.float(), dim=-1)
        sums += [sum(float(logprobs[row, t - 1, ids[t]]) for t in range(start, len(ids)))
                 for row, (ids, start) in enumerate(chunk)]
    right = 0
    for review, (_, gold) in enumerate(REVIEWS):
        scores = sums[review * len(labels):(review + 1) * len(labels)]
        right += labels[scores.index(max(scores))] == gold
    return right / len(REVIEWS)


@pytest.mark.slow
def test_on_new_reviews_the_chat_format_matches_transformers_and_the_default_is_no_worse(smollm2_gguf, hf_smollm2):
    lm = sparkgpt.load(smollm2_gguf, device="cpu")
    labels = ["positive", "negative"]

    def accuracy(results) -> float:
        return sum(max(r, key=r.get) == gold for r, (_, gold) in zip(results, REVIEWS, strict=True)) / len(REVIEWS)

    texts = [text for text, _ in REVIEWS]
    default = classify_many(lm, texts, labels, batch_size=16)
    as_reply = classify_many(lm, texts, labels, chat=True, batch_size=16)
    theirs = transformers_chat_accuracy(*hf_smollm2, lm, labels)
    print(f"ours: {default[0].choice.name} (the default) {accuracy(default):.3f}, {as_reply[0].choice.name} "
          f"{accuracy(as_reply):.3f}; transformers, the label as the reply: {theirs:.3f}")
    assert abs(accuracy(as_reply) - theirs) <= 0.05
    assert accuracy(default) >= theirs - 0.05
