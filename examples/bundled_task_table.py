"""The docs' table: a model on every bundled task at 0 and 3 shots (plain prompts, greedy decoding).

    python examples/bundled_task_table.py [REF]        # default: smollm2-135m-instruct
"""

from __future__ import annotations

import sys

import sparkgpt
from sparkgpt.evaluate.harness import evaluate
from sparkgpt.evaluate.task import bundled_tasks


def main() -> None:
    ref = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
    lm = sparkgpt.load(ref, device="cpu")
    print("| task | metric | 0-shot | 3-shot |\n|---|---|---:|---:|")
    for name in bundled_tasks():
        zero, three = (evaluate(lm, name, shots=shots, progress=False) for shots in (0, 3))
        for metric in zero.metrics:
            print(f"| {name} | {metric} | {zero.metrics[metric]:.1f} | {three.metrics[metric]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
