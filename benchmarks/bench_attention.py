"""Sliding-window (local) attention beside dense causal attention: forward + backward time and peak memory.

Both sides are one attention layer's core, softmax(Q Kᵀ/√d + M) V, on the same q, k, v [1, 8 heads, T, 64] fp32:
dense causal is torch's scaled_dot_product_attention(is_causal=True) (the flash kernel), local is sparkgpt's fast
path for window 256 (`sparkgpt.model.sparse.sparse_attention`, pattern "local"). For context the masked reference
(SDPA with the explicit band mask, what the fast path must equal) runs at the lengths where its T×T mask fits.
The benchmark first checks that the fast path equals the masked reference (forward and gradients) at 1,024 tokens.

Time: each (implementation, length) runs `--repeats` forward + backward passes in a fresh process, `--rounds`
times with the implementations in turn (one round at 16k); the figure is the best pass. Peak memory: the growth of
the first process's peak resident set over its size with the inputs allocated (what attention's forward and
backward add).

    python benchmarks/bench_attention.py [--lengths 1024 4096 16384] [--window 256] [--threads 2] [--repeats 3]
                                         [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

from sparkgpt import hardware
from sparkgpt.model.sparse import pattern_mask, sparse_attention

HEADS, HEAD_DIM = 8, 64


def make_inputs(length: int) -> list[torch.Tensor]:
    """q, k, v [1, H, T, d] laid out as an attention layer's projections leave them: [1, T, H, d] seen transposed."""
    torch.manual_seed(0)
    return [torch.randn(1, length, HEADS, HEAD_DIM).transpose(1, 2).requires_grad_() for _ in range(3)]


def attention(kind: str, window: int):
    if kind == "dense":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if kind == "local":
        return lambda q, k, v: sparse_attention(q, k, v, "local", window)

    def masked(q, k, v):
        mask = pattern_mask("local", q.shape[2], q.shape[2], window, 1, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return masked


def current_rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def measure(kind: str, length: int, window: int, repeats: int) -> dict[str, float]:
    """One (implementation, length) in this process: peak memory of the first pass, then the best time."""
    q, k, v = make_inputs(length)
    grad = torch.randn(1, length, HEADS, HEAD_DIM).transpose(1, 2)  # as the output projection's backward gives it
    run = attention(kind, window)

    def step() -> None:
        out = run(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    base = current_rss_kib()
    step()
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_mib": max(peak_mib, 0.0)}


def check_equal(window: int) -> None:
    q, k, v = make_inputs(1024)
    outputs = []
    for kind in ("local", "masked"):
        out = attention(kind, window)(q, k, v)
        outputs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    error = max((a - b).abs().max().item() for a, b in zip(*outputs, strict=True))
    print(f"check: local fast path vs masked reference at 1,024 tokens, max |difference| (out and grads) {error:.1e}")
    assert error < 1e-4, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="passes per process (the best is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per implementation, taken in turn")
    parser.add_argument("--masked-up-to", type=int, default=4096, help="longest length for the masked reference")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        kind, length = args.one[0], int(args.one[1])
        print(json.dumps(measure(kind, length, args.window, args.repeats if length < 16384 else 1)))
        return
    check_equal(args.window)
    print(f"CPU: {hardware.cpu().describe()}")
    print(f"q, k, v [1, {HEADS}, T, {HEAD_DIM}] fp32, window {args.window}, {args.threads} threads; "
          f"forward + backward, best of {args.rounds} rounds × {args.repeats} passes; peak = growth of peak RSS")
    print(f"{'T':>7} {'implementation':<28} {'fwd+bwd ms':>11} {'peak MiB':>9} {'speed-up':>9}")
    for length in args.lengths:
        kinds = ["dense", "local"] + (["masked"] if length <= args.masked_up_to else [])
        results: dict[str, dict[str, float]] = {}
        # Rounds of one fresh process per implementation, in turn: the machine's drift (up to 2× within the hour
        # here) falls on dense and local alike; each figure is the best of its rounds.
        for _ in range(args.rounds if length < 16384 else 1):
            for kind in kinds:
                command = [sys.executable, __file__, "--one", kind, str(length), "--window", str(args.window),
                           "--threads", str(args.threads), "--repeats", str(args.repeats)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                result = json.loads(output.strip().splitlines()[-1])
                best = results.setdefault(kind, result)
                best["seconds"] = min(best["seconds"], result["seconds"])
        names = {"dense": "dense causal (SDPA flash)", "local": f"local w={args.window} (sparkgpt)",
                 "masked": "local, masked reference (SDPA)"}
        for kind in kinds:
            r = results[kind]
            speedup = results["dense"]["seconds"] / r["seconds"]
            print(f"{length:>7} {names[kind]:<28} {r['seconds'] * 1000:>11.1f} {r['peak_mib']:>9.1f} {speedup:>8.2f}×")


if __name__ == "__main__":
    main()
