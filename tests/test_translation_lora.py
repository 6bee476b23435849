"""The low-resource translation recipe: LoRA fine-tuning with the `finetune-lora` defaults, on a few hundred
English→Spanish pairs written for the project, lifts the real SmolLM2's chrF on the bundled task's held-out items."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import sparkgpt
from sparkgpt.evaluate.harness import evaluate
from sparkgpt.evaluate.task import Item, load_task
from sparkgpt.files import read_jsonl

PAIRS = Path(__file__).resolve().parent.parent / "examples" / "translation_en_es_train.jsonl"


def test_the_training_pairs_use_the_tasks_zero_shot_prompt_and_none_is_an_evaluation_sentence():
    task = load_task("translation_en_es")
    records = [record for _, record in read_jsonl(PAIRS)]
    sources = [re.fullmatch(r"Translate English to Spanish\.\n\nEnglish: (.+)\nSpanish:", r["prompt"])[1]
               for r in records]
    assert len(records) >= 200 and len(set(sources)) == len(sources)
    assert all(r["prompt"] == task.context(Item({"source": s}, ""), []) for r, s in zip(records, sources,
                                                                                        strict=True))
    evaluation = {item.fields["source"] for item in task.items + task.fewshot_items}
    assert not evaluation & set(sources)


@pytest.mark.slow
def test_lora_defaults_on_written_pairs_lift_english_to_spanish_chrf(smollm2_gguf, tmp_path):
    base = sparkgpt.load(smollm2_gguf, device="cpu")
    before = evaluate(base, "translation_en_es", shots=0, progress=False).metrics["chrf"]
    result = sparkgpt.finetune(smollm2_gguf, PAIRS, tmp_path / "run", progress=False)  # no overrides
    tuned = sparkgpt.load(result.best_checkpoint, device="cpu")
    after = evaluate(tuned, "translation_en_es", shots=0, progress=False).metrics["chrf"]
    print(f"chrF {before:.1f} -> {after:.1f}")
    # Measured: 15.4 -> 20.4 (and 17.7 for the base model with three examples in its prompt); half the gain leaves
    # room for another CPU's arithmetic.
    assert after >= before + 2.5
