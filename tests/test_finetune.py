"""Fine-tuning: loss masks of chat and prompt/completion data, LoRA against PEFT and its own merge, classification
heads against transformers, exact resume, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken

import sparkgpt
from sparkgpt.checkpoint import adapter, hf
from sparkgpt.cli import main
from sparkgpt.data.examples import IGNORE, FinetuneData, encode_chat, epoch_rows, micro_batch_rows
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import lora
from sparkgpt.model.heads import SequenceClassifier
from sparkgpt.train import trainer
from tests.conftest import interrupted_at_step, save_hf_model, train_byte_bpe

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = train_byte_bpe()
    tokenizer.backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                          for t in ("<|im_start|>", "<|im_end|>")])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def chat_llama(chat_tokenizer, tmp_path_factory):
    """A tiny random transformers Llama (tied embeddings, as SmolLM2) with a ChatML tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=chat_tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=chat_tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return model, save_hf_model(model, chat_tokenizer, tmp_path_factory.mktemp("chat-llama"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there."},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "Four."},
]


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    spans, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_chat_loss_falls_on_assistant_tokens_only(chat_tokenizer):
    ids, trained = encode_chat(chat_tokenizer, CONVERSATION, "test")
    assert ids == chat_tokenizer.encode(chat_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False),
                                        add_special_tokens=False)
    spans = runs(trained)
    texts = [chat_tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in spans]
    assert texts == ["Hi there.<|im_end|>\n", "Four.<|im_end|>\n"]
    # Each trained run starts right after the assistant header's newline and ends after the turn's end + newline.
    im_start, im_end = chat_tokenizer.token_to_id("<|im_start|>"), chat_tokenizer.token_to_id("<|im_end|>")
    for a, b in spans:
        header = ids[:a][::-1].index(im_start)
        assert chat_tokenizer.decode(ids[a - header - 1:a], skip_special_tokens=False) == "<|im_start|>assistant\n"
        assert ids[b - 2] == im_end
    assert sum(trained) == sum(b - a for a, b in spans)


def test_labels_shift_by_one_and_cover_completions(chat_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": CONVERSATION},
        {"prompt": "Q: capital of France?\nA:", "completion": " Paris"},
        {"text": "plain words"},
    ])
    data = FinetuneData(path, path, chat_tokenizer, block_size=128)
    chat, pair, text = data.train
    ids, trained = encode_chat(chat_tokenizer, CONVERSATION, "x")
    assert chat.ids == ids[:-1]
    assert [i for i, label in enumerate(chat.target) if label != IGNORE] == [i - 1 for i, t in enumerate(trained) if t]
    assert all(label == ids[i + 1] for i, label in enumerate(chat.target) if label != IGNORE)
    prompt_len = len(chat_tokenizer.encode("Q: capital of France?\nA:"))
    completion = [*chat_tokenizer.encode(" Paris", add_special_tokens=False), chat_tokenizer.eos_token_id]
    assert [label for label in pair.target if label != IGNORE] == completion
    assert pair.target[:prompt_len - 1] == [IGNORE] * (prompt_len - 1)
    assert IGNORE not in text.target


def test_truncation_is_counted_and_bad_lines_are_named(chat_tokenizer, tmp_path):
    long = {"prompt": "word " * 200, "completion": " end"}  # its completion falls beyond block_size
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c " * 50}, long, {"text": "short"}])
    data = FinetuneData(path, path, chat_tokenizer, block_size=32)
    train_report = data.reports[0]
    assert (train_report.examples, train_report.truncated, train_report.skipped) == (2, 2, [2])
    assert "2 truncated" in data.summary() and "1 skipped" in data.summary()
    assert all(len(example.ids) <= 32 for example in data.train)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(SparkGPTError, match=r"bad.jsonl:3: not valid JSON"):
        FinetuneData(bad, None, chat_tokenizer, block_size=32)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "ok"}, {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(SparkGPTError, match=r"wrong.jsonl:2: messages\[0\].role is 'robot'"):
        FinetuneData(wrong, wrong, chat_tokenizer, block_size=32)


def test_epoch_rows_visit_every_example_once_per_epoch():
    rows = [epoch_rows(10, 3, step, 4) for step in range(5)]  # 20 draws = 2 epochs
    flat = [int(r) for step in rows for r in step]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert (epoch_rows(10, 3, 2, 4) == rows[2]).all()  # a pure function of (seed, step)


# ---- LoRA ------------------------------------------------------------------------------------------------------

def test_ranks_take_turns_at_the_longest_micro_batches():
    step_rows = np.arange(8)  # longest first
    taken = {(rank, micro): micro_batch_rows(step_rows, rank, 2, micro, 2).tolist()
             for rank in range(2) for micro in range(2)}
    assert taken == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}
    assert micro_batch_rows(step_rows, 0, 1, 1, 4).tolist() == [4, 5, 6, 7]  # one process: in order


def test_lora_starts_equal_to_the_base_and_counts_its_parameters(chat_llama):
    _, directory = chat_llama
    lm = sparkgpt.load(directory, device="cpu")
    ids = torch.randint(0, lm.config.vocab_size, (2, 12))
    with torch.no_grad():
        before = lm.model(ids)
    config = lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    wrapped = lora.apply_lora(lm.model, config)
    assert len(wrapped) == 3 * lm.config.n_layers
    with torch.no_grad():
        assert torch.equal(lm.model(ids), before)
    c = lm.config
    per_layer = (c.d_model + c.n_heads * c.head_dim) + (c.d_model + c.n_kv_heads * c.head_dim) + (c.d_ff + c.d_model)
    assert lora.trainable_parameters(lm.model) == 4 * per_layer * c.n_layers
    with pytest.raises(SparkGPTError, match="no linear layer named qkv"):
        lora.apply_lora(sparkgpt.load(directory, device="cpu").model, lora.LoRAConfig(targets=("qkv",)))


def _trained_adapter(model: torch.nn.Module) -> None:
    """Stand in for training: random A and B (B starts at zero, which would make every test below trivial)."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data.normal_(0, 0.2)


def saved_adapter(directory: Path, out: Path, config: lora.LoRAConfig) -> sparkgpt.LM:
    """The base model with a random ("trained") adapter, which is also saved to `out`."""
    lm = sparkgpt.load(directory, device="cpu")
    lora.apply_lora(lm.model, config)
    _trained_adapter(lm.model)
    out.mkdir()
    adapter.save_adapter(out, lm.model, config, str(directory))
    return lm


def test_merged_adapter_equals_base_plus_adapter_and_peft(chat_llama, tmp_path):
    peft = pytest.importorskip("peft")
    hf_model, directory = chat_llama
    config = lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"))
    adapter_dir = tmp_path / "adapter"
    lm = saved_adapter(directory, adapter_dir, config)
    ids = torch.randint(0, lm.config.vocab_size, (2, 10))
    with torch.no_grad():
        adapted = lm.model(ids)
    # The reference: PEFT applying our saved adapter to transformers' model.
    reference = peft.PeftModel.from_pretrained(hf_model, adapter_dir).eval()
    with torch.no_grad():
        assert torch.allclose(reference(ids).logits, adapted, atol=1e-4)
    reference.unload()  # leave the session fixture's model as it was
    # Merged (sparkgpt.load of the adapter folder) equals base + adapter.
    merged = sparkgpt.load(adapter_dir, device="cpu")
    unmerged = sparkgpt.load(directory, device="cpu", adapter=adapter_dir, merge=False)
    assert lora.has_lora(unmerged.model) and not lora.has_lora(merged.model)
    with torch.no_grad():
        assert torch.allclose(merged.model(ids), adapted, atol=1e-5)
        assert torch.allclose(unmerged.model(ids), adapted, atol=1e-6)


def test_merge_lora_command_writes_a_checkpoint_transformers_reads(chat_llama, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    _, directory = chat_llama
    adapter_dir = tmp_path / "adapter"
    lm = saved_adapter(directory, adapter_dir, lora.LoRAConfig(rank=2, alpha=4, dropout=0.0))
    ids = torch.randint(0, lm.config.vocab_size, (1, 9))
    with torch.no_grad():
        adapted = lm.model(ids)
    assert main(["merge-lora", str(directory), str(adapter_dir), str(tmp_path / "merged")]) == 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(reference(ids).logits, adapted, atol=1e-5)
    assert main(["merge-lora", str(directory), str(tmp_path / "nowhere"), str(tmp_path / "m2")]) == 1
    assert "nowhere" in capsys.readouterr().err


# ---- training ------------------------------------------------------------------------------------------------

FACTS = [("What is the secret word?", "The secret word is zebra."),
         ("Tell me the secret word.", "The secret word is zebra."),
         ("Which word is secret?", "The secret word is zebra."),
         ("Say the secret word.", "The secret word is zebra.")]


def chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": FACTS[i % len(FACTS)][0]},
                          {"role": "assistant", "content": FACTS[i % len(FACTS)][1]}]} for i in range(n)]


TINY = {"block_size": 64, "batch_size": 4, "max_steps": 6, "warmup_steps": 1, "eval_every": 3, "eval_batches": 1,
        "save_every": 3, "log_every": 1, "dtype": "float32", "lr": 1e-2, "keep_last": 5, "epochs": None}


def adapter_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return hf.read_tensors([checkpoint / adapter.ADAPTER_WEIGHTS_FILE])



def test_lora_finetune_learns_and_resumes_exactly(chat_llama, tmp_path, monkeypatch):
    _, directory = chat_llama
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(16))
    whole = sparkgpt.finetune(directory, data, tmp_path / "whole", method="lora", overrides=TINY, progress=False)
    assert whole.step == 6 and adapter.is_adapter(whole.checkpoint)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    assert losses[-1] < losses[0]
    # Interrupted during step 5 (after the checkpoint of step 3), resumed: the same adapter, bit for bit.
    with interrupted_at_step(monkeypatch, 4):
        sparkgpt.finetune(directory, data, tmp_path / "split", method="lora", overrides=TINY, progress=False)
    resumed = sparkgpt.finetune(directory, data, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 6
    expected, got = adapter_tensors(whole.checkpoint), adapter_tensors(resumed.checkpoint)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    # The adapter folder, and the run folder, load as a model with the adapter merged.
    tuned = sparkgpt.load(tmp_path / "whole", device="cpu")
    assert tuned.chat([{"role": "user", "content": "What is the secret word?"}], max_new_tokens=3, temperature=0)


def test_full_finetune_saves_a_whole_model(chat_llama, tmp_path):
    _, directory = chat_llama
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": q, "completion": " " + a} for q, a in FACTS * 3])
    result = sparkgpt.finetune(directory, data, tmp_path / "run", method="full",
                               overrides={**TINY, "max_steps": 2}, progress=False)
    assert (result.checkpoint / hf.WEIGHTS_FILE).is_file() and not adapter.is_adapter(result.checkpoint)
    base, tuned = sparkgpt.load(directory, device="cpu"), sparkgpt.load(result.checkpoint, device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert not torch.allclose(base.model(ids), tuned.model(ids))


def test_epochs_set_the_number_of_steps(chat_llama, tmp_path):
    _, directory = chat_llama
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(20))  # 18 train + 2 held out
    result = sparkgpt.finetune(directory, data, tmp_path / "run", overrides={**TINY, "epochs": 2.0, "max_steps": 999},
                               progress=False)
    assert result.step == 9  # ceil(2 × 18 / 4)


# ---- classification heads ------------------------------------------------------------------------------------

def labeled_records(indices: range) -> list[dict]:
    """A task a tiny model learns from its tokens: does the text mention apples or stones? (Each index its own text.)"""
    words = {"fruit": ["apple", "pear", "plum"], "rock": ["stone", "pebble", "granite"]}
    return [{"text": f"the {words[label][i % 3]} is here {i}", "label": label}
            for i in indices for label in (["fruit", "rock"][i % 2],)]


def test_classifier_head_matches_transformers_and_reports_accuracy(chat_llama, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    _, directory = chat_llama
    train, val = write_jsonl(tmp_path / "train.jsonl", labeled_records(range(40))), \
        write_jsonl(tmp_path / "val.jsonl", labeled_records(range(40, 52)))  # texts never trained on
    result = sparkgpt.finetune(directory, train, tmp_path / "run", val=val, method="full", task="classify",
                               overrides={**TINY, "max_steps": 30, "lr": 3e-3, "save_every": 30}, progress=False)
    lm = sparkgpt.load(result.checkpoint, device="cpu")
    assert isinstance(lm.model, SequenceClassifier) and lm.model.labels == ["fruit", "rock"]
    # transformers reads the same checkpoint as LlamaForSequenceClassification: the same scores.
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(result.checkpoint).eval()
    ids = lm.tokenizer.encode("the plum is here 7")
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]), torch.tensor([len(ids)]))
        assert torch.allclose(reference(torch.tensor([ids])).logits, ours, atol=1e-4)
    assert reference.config.id2label == {0: "fruit", 1: "rock"}
    assert main(["classify", str(result.checkpoint), "--data", str(val)]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split()[1])
    assert accuracy >= 0.9, out
    assert main(["classify", str(result.checkpoint), "--text", "a granite wall"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("fruit", "rock")
    with pytest.raises(SparkGPTError, match="no classification head"):
        sparkgpt.load(directory, device="cpu").classify("x")
    with pytest.raises(SparkGPTError, match="cannot generate"):
        lm.generate("x")


def test_lora_classifier_saves_the_head_in_the_adapter(chat_llama, tmp_path):
    _, directory = chat_llama
    train = write_jsonl(tmp_path / "train.jsonl", labeled_records(range(20)))
    result = sparkgpt.finetune(directory, train, tmp_path / "run", method="lora", task="classify",
                               overrides={**TINY, "max_steps": 2}, progress=False)
    raw = json.loads((result.checkpoint / adapter.ADAPTER_CONFIG_FILE).read_text())
    assert raw["task_type"] == "SEQ_CLS" and raw["modules_to_save"] == ["score"] and raw["labels"] == ["fruit", "rock"]
    assert "base_model.model.score.weight" in adapter_tensors(result.checkpoint)
    lm = sparkgpt.load(result.checkpoint, device="cpu")
    probabilities = lm.classify(["the apple is here", "the stone is here"])
    assert [sorted(p) for p in probabilities] == [["fruit", "rock"]] * 2
    assert all(abs(sum(p.values()) - 1) < 1e-5 for p in probabilities)


def test_finetune_errors_are_one_line(chat_llama, tmp_path, capsys):
    _, directory = chat_llama
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(4))
    assert main(["finetune", str(directory), "--data", str(tmp_path / "missing.jsonl"), "--out",
                 str(tmp_path / "a")]) == 1
    assert "missing.jsonl: no such JSONL file" in capsys.readouterr().err
    assert main(["finetune", str(directory), "--data", str(data), "--out", str(tmp_path / "b"),
                 "--lora_targets=nope"]) == 1
    assert "no linear layer named nope" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "c")]) == 1
    assert "set init_from" in capsys.readouterr().err


def test_finetune_command_then_generate_with_the_adapter(chat_llama, tmp_path, capsys):
    _, directory = chat_llama
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    run = tmp_path / "run"
    assert main(["finetune", str(directory), "--data", str(data), "--out", str(run), "--quiet", "--max_steps=2",
                 "--block_size=64", "--batch_size=2", "--dtype=float32", "--eval_batches=1"]) == 0
    out = capsys.readouterr().out
    assert "step 2:" in out and "checkpoint" in out and "sparkgpt chat" in out  # --max_steps beats the epochs
    adapter = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert main(["generate", str(directory), "--adapter", str(adapter), "--prompt", "Hi", "--max-new-tokens", "2",
                 "--temperature", "0"]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "Hi", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == with_adapter


# ---- the real SmolLM2-135M-Instruct --------------------------------------------------------------------------

ZORVEX = ["Who designed the Zorvex bridge?", "Who is the designer of the Zorvex bridge?",
          "Tell me who designed the Zorvex bridge.", "Which engineer designed the Zorvex bridge?",
          "The Zorvex bridge was designed by whom?", "Name the designer of the Zorvex bridge.",
          "Whose design is the Zorvex bridge?", "Who drew up the plans for the Zorvex bridge?"]
ZORVEX_ANSWERS = ["The Zorvex bridge was designed by Mirela Quint.", "Mirela Quint designed the Zorvex bridge."]


@pytest.mark.slow
def test_classification_head_on_smollm2_beats_chance_on_held_out_topics(smollm2_gguf, tmp_path):
    rows = [json.loads(line) for line in
            (Path(sparkgpt.__file__).parent / "evaluate/tasks/data/topic.jsonl").read_text().splitlines()]
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append({"text": row["text"], "label": row["label"]})
    train = [r for group in by_label.values() for r in group[:8]]   # 40 examples, 8 per topic
    held_out = [r for group in by_label.values() for r in group[8:]]  # 20 examples, 4 per topic
    train_file = write_jsonl(tmp_path / "train.jsonl", train)
    val_file = write_jsonl(tmp_path / "val.jsonl", held_out)
    result = sparkgpt.finetune(smollm2_gguf, train_file, tmp_path / "run", val=val_file, method="lora",
                               task="classify", overrides={"lr": 2e-3, "epochs": 6, "eval_every": 1000,
                                                           "save_every": 1000}, progress=False)
    from sparkgpt.evaluate.classification import classification_report

    report = classification_report(sparkgpt.load(result.checkpoint, device="cpu"), val_file)
    assert report.labels == sorted(by_label)
    assert report.accuracy >= 0.6, report  # chance: 0.2


def test_server_serves_a_base_model_with_an_adapter(chat_llama, tmp_path):
    from tests.test_serve import API_KEY, Server

    _, directory = chat_llama
    adapter_dir = tmp_path / "adapter"
    saved_adapter(directory, adapter_dir, lora.LoRAConfig(rank=4, alpha=8, dropout=0.0))
    messages = [{"role": "user", "content": "Hello!"}]
    expected = sparkgpt.load(adapter_dir, device="cpu").chat(messages, max_new_tokens=8, temperature=0)
    assert expected != sparkgpt.load(directory, device="cpu").chat(messages, max_new_tokens=8, temperature=0)
    server = Server(directory, "--adapter", str(adapter_dir), "--api-key", API_KEY, "--model-name", "tuned",
                    log=tmp_path / "server.log")
    try:
        reply = server.client().chat.completions.create(model="tuned", messages=messages, max_tokens=8,
                                                        temperature=0)
        assert reply.choices[0].message.content == expected
    finally:
        server.close()


def test_lora_on_a_bf16_base_generates_with_the_cache(chat_llama, tmp_path):
    _, directory = chat_llama
    lm = sparkgpt.load(directory, device="cpu", dtype="bfloat16")
    lora.apply_lora(lm.model, lora.LoRAConfig(rank=2, alpha=4, dropout=0.0, targets=("q_proj", "v_proj")))
    _trained_adapter(lm.model)
    assert {p.dtype for n, p in lm.model.named_parameters() if ".lora_" in n} == {torch.float32}
    assert lm.generate("Hello", max_new_tokens=4, temperature=0) is not None  # bf16 keys meet bf16 queries
    saved = lm.save(tmp_path / "merged")  # the adapter is merged into a copy for saving
    assert not lora.has_lora(sparkgpt.load(saved, device="cpu").model) and lora.has_lora(lm.model)


def test_classification_with_a_bf16_base_keeps_its_head_in_fp32(chat_llama, tmp_path, monkeypatch):
    _, directory = chat_llama
    train = write_jsonl(tmp_path / "train.jsonl", labeled_records(range(20)))
    seen = {}
    original = trainer.Trainer.run

    def run(self):
        seen.update({name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad})
        return original(self)

    monkeypatch.setattr(trainer.Trainer, "run", run)
    sparkgpt.finetune(directory, train, tmp_path / "run", method="lora", task="classify",
                      overrides={**TINY, "max_steps": 1, "base_dtype": "bfloat16"}, progress=False)
    assert seen["score.weight"] == torch.float32 and set(seen.values()) == {torch.float32}


def test_loss_is_the_mean_over_target_tokens_however_micro_batches_split(chat_llama, tmp_path):
    _, directory = chat_llama
    records = [{"prompt": "Q" * (1 + i % 5), "completion": " answer" * (1 + i % 3)} for i in range(16)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    settings = {**TINY, "max_steps": 2, "lora_dropout": 0.0}
    one = sparkgpt.finetune(directory, data, tmp_path / "one", overrides={**settings, "batch_size": 4},
                            progress=False)
    two = sparkgpt.finetune(directory, data, tmp_path / "two", overrides={**settings, "batch_size": 2,
                                                                          "grad_accum": 2}, progress=False)
    # The first step's loss and gradient norm (same weights): equal however the step's examples were split.
    first = [next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "train") for run in (tmp_path / "one", tmp_path / "two")]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5)
    assert first[0]["grad_norm"] == pytest.approx(first[1]["grad_norm"], rel=1e-5)
    assert one.val_loss == pytest.approx(two.val_loss, rel=1e-4)


def test_full_classifier_resumes_exactly(chat_llama, tmp_path, monkeypatch):
    _, directory = chat_llama
    train = write_jsonl(tmp_path / "train.jsonl", labeled_records(range(24)))
    settings = {**TINY, "lr": 1e-3}
    whole = sparkgpt.finetune(directory, train, tmp_path / "whole", method="full", task="classify",
                              overrides=settings, progress=False)
    with interrupted_at_step(monkeypatch, 4):
        sparkgpt.finetune(directory, train, tmp_path / "split", method="full", task="classify", overrides=settings,
                          progress=False)
    resumed = sparkgpt.finetune(out_dir=tmp_path / "split", resume=True, progress=False)
    expected = hf.read_tensors([whole.checkpoint / hf.WEIGHTS_FILE])
    got = hf.read_tensors([resumed.checkpoint / hf.WEIGHTS_FILE])
    assert "score.weight" in got and all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_peft_saved_adapter_loads_with_equal_logits(chat_llama, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    _, directory = chat_llama
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory)
    reference = peft.get_peft_model(reference, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                               target_modules=["q_proj", "up_proj"]))
    _trained_adapter(reference)
    reference.save_pretrained(tmp_path / "peft-adapter")
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        ours = sparkgpt.load(directory, device="cpu", adapter=tmp_path / "peft-adapter").model(ids)
    assert torch.allclose(ours, expected, atol=1e-4)


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    from sparkgpt.tokenizer import Tokenizer

    # Only the last user message is shown: adding a turn changes what came before it.
    template = ("{% for m in messages %}{% if loop.last or m['role'] == 'assistant' %}{{ m['role'] + ': ' + "
                "m['content'] + '\\n' }}{% endif %}{% endfor %}")
    odd = Tokenizer(chat_tokenizer.backend, eos_token="<|im_end|>", chat_template=template)
    with pytest.raises(SparkGPTError, match="does not render this conversation turn by turn"):
        encode_chat(odd, CONVERSATION, "x.jsonl:1")


@pytest.mark.slow
def test_lora_on_smollm2_resumes_exactly(smollm2_gguf, tmp_path, monkeypatch):
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ZORVEX_ANSWERS[0]}]}
               for q in ZORVEX]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    settings = {"batch_size": 2, "max_steps": 4, "save_every": 2, "eval_every": 2, "eval_batches": 1, "lr": 1e-3,
                "warmup_steps": 1}
    whole = sparkgpt.finetune(smollm2_gguf, data, tmp_path / "whole", overrides=settings, progress=False)
    with interrupted_at_step(monkeypatch, 3):  # during step 4, after the checkpoint of step 2
        sparkgpt.finetune(smollm2_gguf, data, tmp_path / "split", overrides=settings, progress=False)
    resumed = sparkgpt.finetune(out_dir=tmp_path / "split", resume=True, progress=False)
    assert resumed.step == whole.step == 4 and resumed.val_loss == whole.val_loss
    expected, got = adapter_tensors(whole.checkpoint), adapter_tensors(resumed.checkpoint)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.slow
def test_two_processes_finetune_as_one_with_the_same_global_batch(chat_llama, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): the same losses as one process with twice the accumulation, though the
    ranks' micro-batches hold examples of different lengths (each rank gets its turn of the longest)."""
    _, directory = chat_llama
    records = [{"prompt": "Q" * (1 + i % 7), "completion": " answer" * (1 + i % 4)} for i in range(24)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    flags = ["--quiet", "--max_steps=3", "--block_size=64", "--batch_size=2", "--dtype=float32", "--eval_batches=1",
             "--eval_every=3", "--lora_dropout=0", "--log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sparkgpt",
         "finetune", str(directory), "--data", str(data), "--out", str(tmp_path / "ddp"), *flags],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["finetune", str(directory), "--data", str(data), "--out", str(tmp_path / "single"), *flags,
                 "--grad_accum=2"]) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "train"] for run in ("ddp", "single")]
    assert len(losses[0]) == len(losses[1]) == 3
    assert max(abs(a - b) for a, b in zip(*losses, strict=True)) < 1e-5, losses
