"""Zero-/few-shot applications: prompts from one template per task, label probabilities from log-likelihoods,
and the real SmolLM2 doing the tasks."""

from __future__ import annotations

import math

import pytest
import torch

import sparkgpt
from sparkgpt import tasks
from sparkgpt.cli import main


@pytest.fixture(scope="module")
def tiny(hf_llama):
    return sparkgpt.load(hf_llama[1], device="cpu")


def test_prompt_is_instruction_then_examples_then_request(tiny):
    prompt = tasks.build_prompt(tiny, "translate", {"text": "Good night", "source": "English", "target": "French"},
                                examples=[({"text": "Thank you"}, "Merci")], chat=False)
    assert prompt == ("Translate from English to French.\n\nEnglish: Thank you\nFrench: Merci\n\n"
                      "English: Good night\nFrench:")


def test_keyword_examples_are_shown_as_comma_separated_answers(tiny, monkeypatch):
    prompts = []
    monkeypatch.setattr(tiny, "complete", lambda ids, **kw: prompts.append(tiny.tokenizer.decode(ids[0])) or
                        [sparkgpt.Completion("1. solar, 2. panels\n- silicon")])
    found = tasks.keywords(tiny, "Silicon solar panels.", k=3, examples=[("Wind turbines spin.", ["wind", "turbines"])],
                           chat=False)
    assert "Text: Wind turbines spin.\nKeywords: wind, turbines\n\nText: Silicon solar panels." in prompts[0]
    assert found == ["solar", "panels", "silicon"]  # numbered and bulleted replies are read as a list too


def test_a_changed_template_changes_the_prompt(tiny, monkeypatch):
    monkeypatch.setitem(tasks.TEMPLATES, "correct", tasks.Template("Fix it.", "In: {text}\nOut:"))
    assert tasks.build_prompt(tiny, "correct", {"text": "teh cat"}, chat=False) == "Fix it.\n\nIn: teh cat\nOut:"


def label_logprobs(lm, text: str, labels: list[str]) -> list[float]:
    """Mean log-probability per label token, from one full forward pass per label (no prefix reuse)."""
    prompt = tasks.build_prompt(lm, "classify", {"text": text, "labels": ", ".join(labels)}, chat=False)
    means = []
    for label in labels:
        context = lm.tokenizer.encode(prompt, add_special_tokens=False)
        whole = lm.tokenizer.encode(prompt + " " + label, add_special_tokens=False)
        with torch.no_grad():
            logprobs = torch.log_softmax(lm.model(torch.tensor([whole]))[0], dim=-1)
        picked = [float(logprobs[t - 1, whole[t]]) for t in range(len(context), len(whole))]
        means.append(sum(picked) / len(picked))
    return means


def softmax(values: list[float]) -> list[float]:
    weights = [math.exp(v) for v in values]
    return [w / sum(weights) for w in weights]


def test_classify_probabilities_are_a_softmax_of_mean_label_logprobs(tiny):
    labels = ["positive", "negative", "neutral"]
    probabilities = tasks.classify(tiny, "It was fine.", labels, calibrate=False)
    expected = softmax(label_logprobs(tiny, "It was fine.", labels))
    assert list(probabilities) == labels
    for label, p in zip(labels, expected, strict=True):
        assert math.isclose(probabilities[label], p, abs_tol=1e-5)


def test_calibration_divides_out_the_content_free_bias(tiny):
    labels = ["yes", "no"]
    raw = softmax(label_logprobs(tiny, "Is it?", labels))
    bias = softmax(label_logprobs(tiny, "N/A", labels))
    scaled = [r / b for r, b in zip(raw, bias, strict=True)]
    calibrated = tasks.classify(tiny, "Is it?", labels, calibrate=True)
    assert math.isclose(calibrated["yes"], scaled[0] / sum(scaled), abs_tol=1e-5)


def test_classify_rejects_fewer_than_two_labels(tiny):
    with pytest.raises(sparkgpt.SparkGPTError, match="at least two distinct labels"):
        tasks.classify(tiny, "x", ["only"])


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return sparkgpt.load(smollm2_gguf, device="cpu")


@pytest.mark.slow
def test_real_model_does_the_tasks(smollm2):
    assert tasks.classify(smollm2, "Terrible food and rude staff. Never again.", ["positive", "negative"],
                          )["negative"] > 0.5
    assert tasks.classify(smollm2, "Wonderful stay, friendly staff, I loved it!", ["positive", "negative"],
                          )["positive"] > 0.5
    assert "Oslo" in tasks.answer(smollm2, "Where does Marie live now?",
                                  context="Marie moved from Lyon to Oslo in 2019 and works there as a nurse.")
    assert "Paris" in tasks.answer(smollm2, "What is the capital of France?")
    shown = [("He have two dogs.", "He has two dogs."), ("They was late yesterday.", "They were late yesterday."),
             ("I recieved the letter.", "I received the letter.")]
    # Three examples teach the 135M model the task it misses zero-shot (it echoes the sentence back).
    assert tasks.correct(smollm2, "She go to school every day.", examples=shown, chat=False) == \
        "She goes to school every day."


@pytest.mark.slow
def test_task_command_classifies(capsys, smollm2_gguf):
    assert main(["task", "classify", str(smollm2_gguf), "--text", "I hated every minute of it.",
                 "--labels", "positive,negative", "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("negative\t")
