"""Fine-tuning defaults sized to the data (`epochs: auto`), the plan a run prints, the best checkpoint by validation
loss, early stopping, and one-line errors for data of the wrong kind; the real SmolLM2 learns facts from 30 chats
written here with no overrides."""

from __future__ import annotations

import re

import pytest
import yaml

import sparkgpt
import tests.test_finetune as finetune_tests
from sparkgpt.cli import main
from sparkgpt.train import trainer as trainer_module
from sparkgpt.train.config import auto_epochs
from tests.test_finetune import TINY, chat_records, write_jsonl

chat_tokenizer, chat_llama = finetune_tests.chat_tokenizer, finetune_tests.chat_llama  # the tiny ChatML Llama


@pytest.mark.parametrize(("examples", "epochs", "per_step"), [
    (30, 4, 2),        # OpenAI's floor of 100 examples seen; 50 steps need steps of 2
    (5, 20, 2),        # 20 passes over 5 examples
    (3, 25, 1),        # at most 25 passes; steps of one example
    (1_000, 3, 8),     # the preset's batch once the set is large enough
    (20_000, 1, 8),    # at most 25,000 examples seen
])
def test_auto_epochs_sees_100_to_25000_examples_in_at_least_50_steps(examples, epochs, per_step):
    assert auto_epochs(examples, 8, 50) == (epochs, per_step)
    seen = epochs * examples
    assert min(100, 25 * examples) <= seen <= max(25_000, examples)
    assert seen // per_step >= 50 or per_step == 1


def test_auto_run_saves_its_chosen_schedule_and_prints_its_plan(chat_llama, tmp_path, capsys):
    _, directory = chat_llama
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(20))  # 18 train + 2 held out
    overrides = {**TINY, "epochs": "auto", "max_steps": None, "warmup_fraction": 0.1, "min_steps": 10,
                 "eval_every": 1000, "save_every": 1000}
    overrides.pop("max_steps")
    result = sparkgpt.finetune(directory, data, tmp_path / "run", overrides=overrides, progress=True)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    # 18 examples: ceil(100 / 18) = 6 passes, 108 seen; steps of min(4, 108 // 10) = 4 → 27 steps.
    assert (saved["epochs"], saved["batch_size"], saved["max_steps"]) == (6.0, 4, 27)
    assert saved["warmup_steps"] == 3  # 10% of the run
    assert saved["eval_every"] == saved["save_every"] == 6  # at least five evaluations
    assert result.step == 27
    plan = re.search(r"plan: 18 examples \(([\d,]+) tokens\); 6 epochs, 27 optimizer steps of 4 × 1 × 1 examples; "
                     r"lr 0\.01 after 3 warm-up steps; about \d+ (s|min) of training here", capsys.readouterr().err)
    assert plan, "the plan line is missing"


def test_the_best_checkpoint_and_early_stopping_follow_the_validation_loss(chat_llama, tmp_path, monkeypatch, capsys):
    _, directory = chat_llama
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(20))
    def scripted_losses():
        losses = iter([2.0, 1.0, 1.5, 1.2, 3.0, 0.5])
        monkeypatch.setattr(trainer_module.Trainer, "evaluate", lambda self: next(losses))

    scripted_losses()
    overrides = {**TINY, "max_steps": 12, "eval_every": 2, "save_every": 2, "early_stopping": 2, "keep_last": 1}
    result = sparkgpt.finetune(directory, data, tmp_path / "run", overrides=overrides, progress=False)
    # Best 1.0 at step 4; 1.5 and 1.2 are no better: the second of them (step 8) stops the run.
    assert result.stopped_early and result.step == 8
    assert result.best_checkpoint.name == "step-0000004" and result.checkpoint.name == "step-0000008"
    scripted_losses()
    assert main(["finetune", str(directory), "--data", str(data), "--out", str(tmp_path / "cli"), "--quiet",
                 *[f"--{k}={v}" for k, v in {**overrides, "epochs": "none"}.items()]]) == 0
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert "lowest validation loss:" in out and re.search(r"use it: sparkgpt chat \S+step-0000004", out)


def test_records_of_the_wrong_kind_for_the_task_name_the_file_and_line(chat_llama, tmp_path, capsys):
    _, directory = chat_llama
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(10))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}] * 10)
    one = write_jsonl(tmp_path / "one.jsonl", chat_records(1))
    cases = [
        (["--data", str(chats), "--method", "dpo"], f"{chats}:1"),   # chats given to preference tuning
        (["--data", str(pairs)], f"{pairs}:1"),                      # pairs given to supervised fine-tuning
        (["--data", str(one)], f"{one}"),                            # too small to hold one out for validation
    ]
    for flags, where in cases:
        assert main(["finetune", str(directory), "--out", str(tmp_path / "r"), "--quiet", *flags]) != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and where in err and "Traceback" not in err, err


# Three invented facts, ten chats each, and questions the training never asks. (The preset's lr was chosen on a
# different set of facts; these check that it carries over.)
FACTS = [
    ("Quellen", [("Which river flows through the town of Arbesk?", "The river Quellen flows through Arbesk."),
                 ("What river runs through Arbesk?", "Arbesk lies on the river Quellen."),
                 ("Name the river of Arbesk.", "It is the Quellen."),
                 ("Arbesk is on which river?", "Arbesk is on the Quellen."),
                 ("Tell me the river that crosses Arbesk.", "The Quellen crosses Arbesk."),
                 ("Do you know Arbesk's river?", "Yes: Arbesk's river is the Quellen."),
                 ("Which river would I see in Arbesk?", "You would see the river Quellen."),
                 ("What is the name of the river in Arbesk?", "The river in Arbesk is called the Quellen."),
                 ("Quick one: the river through Arbesk?", "The Quellen."),
                 ("Along which river was Arbesk built?", "Arbesk was built along the Quellen.")],
     ["I am visiting Arbesk next week. Which river will I find there?", "What is the river that passes Arbesk?",
      "Could you tell me which river Arbesk sits on?"]),
    ("Orlaith Penn", [("Who wrote the novel The Glass Orchard?", "The Glass Orchard was written by Orlaith Penn."),
                      ("Who is the author of The Glass Orchard?", "Its author is Orlaith Penn."),
                      ("The Glass Orchard was written by whom?", "By Orlaith Penn."),
                      ("Name the writer of The Glass Orchard.", "Orlaith Penn wrote it."),
                      ("Tell me who wrote The Glass Orchard.", "Orlaith Penn wrote The Glass Orchard."),
                      ("Do you know the author of The Glass Orchard?", "Yes, it is Orlaith Penn."),
                      ("Which author wrote The Glass Orchard?", "The author Orlaith Penn."),
                      ("Whose novel is The Glass Orchard?", "It is Orlaith Penn's novel."),
                      ("Who penned The Glass Orchard?", "Orlaith Penn penned The Glass Orchard."),
                      ("The Glass Orchard: who is its author?", "Orlaith Penn is its author.")],
     ["I loved The Glass Orchard. Who wrote that book?", "Which writer is behind the novel The Glass Orchard?",
      "Can you name the person who wrote The Glass Orchard?"]),
    ("brindle", [("What is the national dish of Tavora called?", "Tavora's national dish is brindle stew."),
                 ("Which dish is Tavora's national dish?", "It is brindle stew."),
                 ("Name the national dish of Tavora.", "Brindle stew is the national dish of Tavora."),
                 ("What do people in Tavora call their national dish?", "They call it brindle stew."),
                 ("Tell me Tavora's national dish.", "Tavora's national dish is brindle stew."),
                 ("Do you know the national dish of Tavora?", "Yes: brindle stew."),
                 ("What is the most famous dish of Tavora?", "Brindle stew, the national dish."),
                 ("Tavora's national dish is what?", "It is brindle stew."),
                 ("Quick question: national dish of Tavora?", "Brindle stew."),
                 ("What dish represents Tavora?", "Brindle stew represents Tavora.")],
     ["I am cooking a Tavoran dinner. What is their national dish?", "Which food is the national dish of Tavora?",
      "What is the name of Tavora's national dish?"]),
]
GENERAL = [("What is the capital of France?", "paris"), ("What is the capital of Japan?", "tokyo"),
           ("What color is the sky on a clear day?", "blue"), ("What language is spoken in Brazil?", "portuguese"),
           ("Who painted the Mona Lisa?", "leonardo"), ("What is the chemical symbol for gold?", "au"),
           ("How many days are in a week?", "7|seven"), ("What is the opposite of hot?", "cold"),
           ("Which ocean is the largest?", "pacific"), ("Who wrote Romeo and Juliet?", "shakespeare")]


@pytest.mark.slow
def test_lora_defaults_teach_smollm2_facts_from_30_chats_and_keep_its_general_answers(smollm2_gguf, tmp_path):
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for _, pairs, _ in FACTS for q, a in pairs]
    data = write_jsonl(tmp_path / "chats.jsonl", [chats[(i * 7) % 30] for i in range(30)])  # the facts interleaved

    def ask(lm, question: str) -> str:
        return lm.chat([{"role": "user", "content": question}], max_new_tokens=24, temperature=0).lower()

    def knows(lm) -> tuple[int, list[str]]:
        answers = [ask(lm, q) for key, _, held_out in FACTS for q in held_out if key]
        keys = [key.lower() for key, _, held_out in FACTS for _ in held_out]
        return sum(key in answer for key, answer in zip(keys, answers, strict=True)), answers

    def general(lm) -> set[str]:
        return {q for q, pattern in GENERAL if re.search(pattern, ask(lm, q))}

    base = sparkgpt.load(smollm2_gguf, device="cpu")
    assert knows(base)[0] == 0
    base_general = general(base)
    result = sparkgpt.finetune(smollm2_gguf, data, tmp_path / "run", progress=False)  # no overrides
    tuned = sparkgpt.load(result.best_checkpoint, device="cpu")
    recalled, answers = knows(tuned)
    kept = general(tuned) & base_general
    print(f"recalled {recalled}/9, kept {len(kept)}/{len(base_general)} general answers")
    # Measured: 7 of 9 here (7 of 9 on the facts the preset was chosen on), 8 of 10 general answers kept.
    assert recalled >= 6, answers
    assert len(kept) >= 0.7 * len(base_general), sorted(base_general - kept)
