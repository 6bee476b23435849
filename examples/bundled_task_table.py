"""The docs' tables: a model on every bundled task at 0 and 3 shots (plain prompts, greedy decoding), then on the
grounded tasks (open-domain QA closed-book and with retrieval; knowledge-graph QA by number of hops).

    python examples/bundled_task_table.py [REF]        # default: smollm2-135m-instruct
"""

from __future__ import annotations

import sys

import sparkgpt
from sparkgpt.evaluate.harness import evaluate
from sparkgpt.evaluate.task import bundled_tasks, load_task


def main() -> None:
    ref = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
    lm = sparkgpt.load(ref, device="cpu")
    print("| task | metric | 0-shot | 3-shot |\n|---|---|---:|---:|")
    grounded = []
    for name in bundled_tasks():
        if load_task(name).kind in ("open_domain_qa", "kg_qa"):
            grounded.append(name)
            continue
        zero, three = (evaluate(lm, name, shots=shots, progress=False) for shots in (0, 3))
        for metric in zero.metrics:
            print(f"| {name} | {metric} | {zero.metrics[metric]:.1f} | {three.metrics[metric]:.1f} |", flush=True)
    print("\n| task | metric | score |\n|---|---|---:|")
    for name in grounded:
        report = evaluate(lm, name, progress=False)
        for metric, value in report.metrics.items():
            print(f"| {name} | {metric} | {value:.1f} |", flush=True)


if __name__ == "__main__":
    main()
