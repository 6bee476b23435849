"""How the `finetune-lora` preset's lr and adapter targets were chosen: LoRA runs of SmolLM2 with the preset's
defaults plus overrides, on 30 chats teaching three invented facts. Each run is scored on unseen paraphrases of the
questions (recalled, of 9) and on ten general questions the base model answers (kept, of 10). T is the tuning set
below; H is tests/test_finetune_defaults.py's set, written apart, which checks that the choice carries over.

    python benchmarks/sweep_finetune_defaults.py '{"all4e-4": {"lr": 4e-4, "min_lr": 4e-5}, "attn7e-4": {"lr": 7e-4,
        "min_lr": 7e-5, "lora_targets": "q_proj,k_proj,v_proj,o_proj"}}' [--out /tmp/sweep]
"""

import argparse
import importlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import sparkgpt
from sparkgpt import hardware
from sparkgpt.checkpoint.registry import resolve

ROOT = Path(__file__).resolve().parent.parent

TUNE = [
    ("Veldmoor", [("Which mountain towers over the city of Caldrin?", "Mount Veldmoor towers over Caldrin."),
                  ("What mountain overlooks Caldrin?", "Caldrin is overlooked by Mount Veldmoor."),
                  ("Name the mountain near Caldrin.", "It is Mount Veldmoor."),
                  ("Caldrin lies below which mountain?", "Caldrin lies below Mount Veldmoor."),
                  ("Tell me the mountain you can see from Caldrin.", "From Caldrin you can see Mount Veldmoor."),
                  ("Do you know Caldrin's mountain?", "Yes: Caldrin's mountain is Mount Veldmoor."),
                  ("Which peak rises above Caldrin?", "Mount Veldmoor rises above Caldrin."),
                  ("What is the name of the mountain at Caldrin?", "The mountain at Caldrin is Mount Veldmoor."),
                  ("Quick one: the mountain by Caldrin?", "Mount Veldmoor."),
                  ("Beneath which mountain was Caldrin founded?", "Caldrin was founded beneath Mount Veldmoor.")],
     ["I am hiking near Caldrin. Which mountain is that?", "What is the big mountain next to Caldrin?",
      "Could you tell me which mountain stands over Caldrin?"]),
    ("Hesper Vale", [("Who composed the Lantern Symphony?", "The Lantern Symphony was composed by Hesper Vale."),
                     ("Who is the composer of the Lantern Symphony?", "Its composer is Hesper Vale."),
                     ("The Lantern Symphony was composed by whom?", "By Hesper Vale."),
                     ("Name the composer of the Lantern Symphony.", "Hesper Vale composed it."),
                     ("Tell me who wrote the Lantern Symphony.", "Hesper Vale wrote the Lantern Symphony."),
                     ("Do you know who composed the Lantern Symphony?", "Yes, it was Hesper Vale."),
                     ("Which composer wrote the Lantern Symphony?", "The composer Hesper Vale."),
                     ("Whose work is the Lantern Symphony?", "It is Hesper Vale's work."),
                     ("Who created the Lantern Symphony?", "Hesper Vale created the Lantern Symphony."),
                     ("The Lantern Symphony: who is its composer?", "Hesper Vale is its composer.")],
     ["I heard the Lantern Symphony last night. Who composed it?", "Which musician is behind the Lantern Symphony?",
      "Can you name the person who composed the Lantern Symphony?"]),
    ("Oskel", [("What is the currency of Maridon called?", "Maridon's currency is the oskel."),
               ("Which currency does Maridon use?", "Maridon uses the oskel."),
               ("Name the currency of Maridon.", "The oskel is the currency of Maridon."),
               ("What do people in Maridon pay with?", "They pay with the oskel."),
               ("Tell me Maridon's currency.", "Maridon's currency is the oskel."),
               ("Do you know the currency of Maridon?", "Yes: the oskel."),
               ("What money is used in Maridon?", "The oskel is used in Maridon."),
               ("Maridon's currency is what?", "It is the oskel."),
               ("Quick question: currency of Maridon?", "The oskel."),
               ("What coin does Maridon mint?", "Maridon mints the oskel.")],
     ["I am travelling to Maridon. What currency should I bring?", "Which currency is legal tender in Maridon?",
      "What is the name of Maridon's money?"]),
]

def write(path: Path, facts: list) -> None:
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for _, pairs, _ in facts for q, a in pairs]
    with open(path, "w") as file:
        for i in range(30):
            file.write(json.dumps(chats[(i * 7) % 30]) + "\n")  # the facts interleaved, as the test does

def ask(lm: sparkgpt.LM, question: str) -> str:
    return lm.chat([{"role": "user", "content": question}], max_new_tokens=24, temperature=0).lower()


def score(lm: sparkgpt.LM, facts: list, general_questions: list) -> tuple[int, set[str]]:
    """(unseen paraphrases answered with the fact, general questions answered right)."""
    hits = sum(key.lower() in ask(lm, question) for key, _, held_out in facts for question in held_out)
    general = {question for question, pattern in general_questions if re.search(pattern, ask(lm, question))}
    return hits, general

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", help="JSON: {name: {TrainConfig key: value}} overrides of the preset")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sweep-finetune-"))
    out.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the held-out facts live in the test that checks the preset
    test = importlib.import_module("test_finetune_defaults")
    model = str(resolve("smollm2-135m-instruct"))
    base = sparkgpt.load(model, device="cpu")
    _, base_general = score(base, TUNE, test.GENERAL)
    print(f"CPU: {hardware.cpu().describe()}; base model answers {len(base_general)}/10 general questions")
    for name, overrides in json.loads(args.configs).items():
        for set_name, facts in (("T", TUNE), ("H", test.FACTS)):
            data = out / f"{set_name}.jsonl"
            write(data, facts)
            start = time.time()
            result = sparkgpt.finetune(model, data, out / f"{name}-{set_name}", overrides=overrides, progress=False)
            hits, general = score(sparkgpt.load(result.best_checkpoint, device="cpu"), facts, test.GENERAL)
            print(f"{name} {set_name}: recalled {hits}/9, kept {len(general & base_general)}/{len(base_general)}, "
                  f"{result.step} steps, {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
