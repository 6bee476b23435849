"""Quantised prefill: the prompt matmul in bf16 (the capability default) beside the dtype timed fastest on this CPU.

SmolLM2-135M-Instruct quantised to int4; a 512-token prompt; the two settings alternate, best of three each.

    python benchmarks/bench_quant_prefill.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import sparkgpt
from sparkgpt import hardware
from sparkgpt.model import quant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {hardware.cpu().describe()}")
    lm = sparkgpt.load("smollm2-135m-instruct", device="cpu", quantize="int4")
    ids = lm.encode("The old bridge crossed the river just below the mill. " * 60)[:512]

    def prefill() -> None:
        lm.complete([ids], max_new_tokens=1, temperature=0)

    prefill()  # times each shape's choice (once per CPU; cached)
    timed = dict(quant._PREFILL_DTYPES)
    print("timed choices:", {f"{out}×{inp}": str(dtype).removeprefix("torch.") for (inp, out), dtype in timed.items()})
    settings = {"bf16 (capability)": dict.fromkeys(timed, torch.bfloat16), "timed choice": timed}
    best = dict.fromkeys(settings, float("inf"))
    for _ in range(3):
        for name, choice in settings.items():
            quant._PREFILL_DTYPES.clear()
            quant._PREFILL_DTYPES.update(choice)
            start = time.perf_counter()
            prefill()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:18s} {512 / seconds:7.0f} tok/s prefill (512 tokens, int4)")
    print(f"ratio: {best['bf16 (capability)'] / best['timed choice']:.2f}×")


if __name__ == "__main__":
    main()
