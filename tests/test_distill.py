"""Knowledge distillation: the loss against torch's kl_div and its closed-form gradient, α = 0 as plain training,
exact resume without the teacher in the checkpoint, one-line CLI errors, and a student distilled from SmolLM2 that
beats the same student trained from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.nn import functional as F

import sparkgpt
from sparkgpt.checkpoint import hf
from sparkgpt.cli import main
from sparkgpt.data import prepare
from sparkgpt.errors import SparkGPTError
from sparkgpt.train import train
from sparkgpt.train.distill import distillation_loss
from sparkgpt.train.run import distill
from tests.conftest import CORPUS, interrupted_at_step

# A student of one small layer, a few steps of 2 × 16 tokens; no MFU measurement (it takes a fifth of a second).
TINY = {"model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2, "model.d_ff": 64, "block_size": 16,
        "batch_size": 2, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "eval_every": 3,
        "eval_batches": 2, "save_every": 3, "log_every": 1, "peak_tflops": 1.0, "compile": False}
SUMMARIES = Path(sparkgpt.__file__).parent / "evaluate" / "tasks" / "data" / "summarization.jsonl"



@pytest.fixture(scope="module")
def teacher_data(hf_llama, tmp_path_factory) -> tuple[Path, Path]:
    """(A tiny random Llama teacher's directory, a data folder prepared with its tokenizer.)"""
    _, directory = hf_llama
    root = tmp_path_factory.mktemp("distill")
    (root / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    data = prepare([root / "corpus.txt"], root / "data", tokenizer=str(directory), workers=1, progress=False)
    return directory, data.out_dir


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / hf.WEIGHTS_FILE)


def test_loss_matches_torch_kl_div_and_its_closed_form_gradient():
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(3, 5, 11, generator=generator)).requires_grad_()
    teacher = 3 * torch.randn(3, 5, 11, generator=generator)
    targets = torch.randint(0, 11, (3, 5), generator=generator)
    temperature, alpha, tokens = 2.5, 0.3, 15
    loss, cross_entropy = distillation_loss(student, teacher, targets, temperature, alpha)
    kl = F.kl_div(F.log_softmax(student / temperature, -1).flatten(0, 1),
                  F.log_softmax(teacher / temperature, -1).flatten(0, 1), log_target=True, reduction="batchmean")
    reference_ce = F.cross_entropy(student.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(cross_entropy, reference_ce)
    torch.testing.assert_close(loss, alpha * temperature**2 * kl + (1 - alpha) * reference_ce)
    # d/dz [T² KL] = T (softmax(z/T) − softmax(t/T)); d/dz CE = softmax(z) − onehot; both averaged over tokens.
    loss.backward()
    soft = temperature * (F.softmax(student / temperature, -1) - F.softmax(teacher / temperature, -1))
    hard = F.softmax(student, -1) - F.one_hot(targets, 11)
    torch.testing.assert_close(student.grad, (alpha * soft + (1 - alpha) * hard).detach() / tokens)


def test_student_vocabulary_padded_past_the_teachers():
    """A student with more logits than the teacher has tokens: as if the teacher gave the extra ones (almost) none."""
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 13, generator=generator)
    teacher = torch.randn(4, 11, generator=generator)
    targets = torch.tensor([0, 3, 12, 7])
    padded = torch.cat([teacher, torch.full((4, 2), -1e4)], dim=-1)
    loss, _ = distillation_loss(student, teacher, targets, 2.0, 1.0)
    reference = 4.0 * F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(padded / 2, -1), log_target=True,
                               reduction="batchmean")
    torch.testing.assert_close(loss, reference)


def test_alpha_zero_is_plain_cross_entropy():
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 6, 17, generator=generator), torch.randn(2, 6, 17, generator=generator)
    targets = torch.randint(0, 17, (2, 6), generator=generator)
    loss, cross_entropy = distillation_loss(student, teacher, targets, 2.0, 0.0)
    assert torch.equal(loss, F.cross_entropy(student.flatten(0, 1), targets.flatten())) and torch.equal(
        loss, cross_entropy)


def test_alpha_zero_trains_exactly_as_plain_training(teacher_data, tmp_path):
    """Same seed, same data, α = 0: the distilled student is the one `train` makes, bit for bit (the teacher's
    loading draws no random numbers, the student has the teacher's vocabulary, the loop is the trainer's)."""
    teacher, data = teacher_data
    distilled = distill(teacher, "shakespeare-char", data, tmp_path / "d", overrides={**TINY, "distill_alpha": 0.0},
                        progress=False)
    plain = train("shakespeare-char", tmp_path / "p",
                           {**TINY, "data": str(data), "model.vocab_size": 320}, progress=False)
    assert distilled.val_loss == plain.val_loss
    expected, got = weights(plain.checkpoint), weights(distilled.checkpoint)
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)


def test_resume_is_exact_and_the_teacher_is_never_saved(teacher_data, tmp_path, monkeypatch):
    teacher, data = teacher_data
    whole = distill(teacher, "shakespeare-char", data, tmp_path / "whole", overrides=TINY, progress=False)
    assert whole.step == 6
    config = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())
    assert config["teacher"] == str(teacher) and config["model_overrides"]["vocab_size"] == 320
    student = sparkgpt.load(whole.checkpoint, device="cpu")
    assert student.model.config.n_layers == 1 and student.tokenizer.vocab_size == 320
    assert sum(t.numel() for t in weights(whole.checkpoint).values()) == \
        sum(p.numel() for p in student.model.parameters())  # the student's weights alone
    with interrupted_at_step(monkeypatch, 4):
        distill(teacher, "shakespeare-char", data, tmp_path / "split", overrides=TINY, progress=False)
    resumed = distill(out_dir=tmp_path / "split", resume=True, progress=False)  # the teacher from config.yaml
    assert resumed.step == 6 and resumed.val_loss == whole.val_loss
    expected, got = weights(whole.checkpoint), weights(resumed.checkpoint)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_cli_distills_and_rejects_bad_input_in_one_line(teacher_data, tmp_path, capsys):
    teacher, data = teacher_data
    base = ["distill", "--teacher", str(teacher), "--student", "shakespeare-char", "--quiet"]
    tiny = [f"--{key}={value}" for key, value in TINY.items() if key != "max_steps"] + ["--max_steps=2"]
    assert main([*base, "--data", str(data), "--out", str(tmp_path / "run"), *tiny]) == 0
    assert "step 2: train loss" in capsys.readouterr().out
    char_data = prepare([data / "tokenizer.json"], tmp_path / "char", tokenizer="char", workers=1, progress=False)
    failures = {
        "prepared with a tokenizer of": [*base, "--data", str(char_data.out_dir)],
        "student vocab_size 100 is smaller than the teacher's (320": [*base, "--data", str(data),
                                                                      "--model.vocab_size=100"],
        "'distill_temperature' is 0.0; expected a positive number": [*base, "--data", str(data),
                                                                      "--distill_temperature=0"],
        "'distill_alpha' is 1.5; expected a number in [0, 1]": [*base, "--data", str(data), "--distill_alpha=1.5"],
        "student 'nonsense': not a training preset": ["distill", "--teacher", str(teacher), "--student", "nonsense",
                                                      "--data", str(data)],
        "--teacher, --student and --data are required": ["distill", "--student", "shakespeare-char", "--data",
                                                          str(data)],
        "needs a decoder student built from a model preset; 'tiny-seq2seq'": [*base[:4], "tiny-seq2seq", "--data",
                                                                                str(data)],
    }
    for index, (message, argv) in enumerate(failures.items()):
        assert main([*argv, "--out", str(tmp_path / f"bad{index}"), *tiny]) == 1, message
        err = capsys.readouterr().err
        assert err.startswith("sparkgpt: error: ") and message in err and err.count("\n") == 1, err


def test_python_api_requires_a_teacher_student_and_data(tmp_path):
    with pytest.raises(SparkGPTError, match="needs a teacher, a student and data"):
        distill("smollm2-135m-instruct", None, tmp_path)


@pytest.mark.slow
def test_student_distilled_from_smollm2_beats_the_same_student_from_scratch(smollm2_gguf, tmp_path):
    """20 steps of 4 × 32 tokens of the bundled news summaries: the student that learns SmolLM2's softened
    distribution reaches a lower validation loss (plain next-token cross-entropy on the same held-out tokens) than
    the same student, from the same initial weights, trained on the next tokens alone."""
    data = prepare([SUMMARIES], tmp_path / "data", tokenizer="smollm2-135m-instruct", workers=1, progress=False)
    settings = {"model.n_layers": 2, "model.d_model": 64, "model.d_ff": 176, "block_size": 32, "batch_size": 4,
                "max_steps": 20, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "eval_every": 20, "eval_batches": 8,
                "save_every": 20, "log_every": 5, "dtype": "bfloat16", "seed": 0, "peak_tflops": 1.0, "compile": False}
    distilled = distill("smollm2-135m-instruct", "shakespeare-char", data.out_dir, tmp_path / "distilled",
                        overrides=settings, progress=False)
    scratch = train("shakespeare-char", tmp_path / "scratch",
                             {**settings, "data": str(data.out_dir), "model.vocab_size": 49152}, progress=False)
    assert distilled.val_loss < scratch.val_loss - 0.1, (distilled.val_loss, scratch.val_loss)
