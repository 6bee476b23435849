"""Data parallelism on CPU: a GPT-2-medium-shaped model (24 layers, 1024 wide, 16 heads, vocabulary 50,257;
355M parameters) trained by 2 processes (gloo) under DDP, FSDP2, and FSDP2 with activation checkpointing.

For each: tokens/s (the median step after a warm-up step, both processes together) and the peak memory of one
training step per rank, measured by PyTorch's MemTracker (FSDPMemTracker under FSDP), beside the memory
planner's estimate (sparkgpt/train/plan.py) for the same shape. fp32, block 128, micro-batch 2 per process: the planner
is checked in the precision the tests use. Each mode is its own torchrun launch, so none inherits the memory of
another; all run in this one invocation.

    flock /tmp/sparkgpt-bench.lock .venv/bin/python benchmarks/bench_parallel.py [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sparkgpt import hardware

WORK = Path("runs/bench-parallel")
MODES = {"DDP": ("ddp", False), "FSDP2": ("fsdp", False), "FSDP2 + activation checkpointing": ("fsdp", True)}
SHAPE = {"model": "gpt2-medium", "model.vocab_size": "50257", "block_size": "128", "batch_size": "2",
         "dtype": "float32", "warmup_steps": "1", "max_steps": "100", "compile": "false"}


def make_data(directory: Path) -> None:
    """Random token ids below GPT-2's vocabulary: throughput and memory do not depend on what the text says."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, count in (("train.bin", 200_000), ("val.bin", 20_000)):
        rng.integers(0, 50257, size=count, dtype=np.uint16).tofile(directory / name)
    meta = {"vocab_size": 50257, "dtype": "uint16", "train_tokens": 200_000, "val_tokens": 20_000}
    (directory / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def worker(mode: str, steps: int) -> None:
    """One rank of one mode (run under torchrun): time `steps` steps, then measure one step's peak memory."""
    import torch

    from sparkgpt.train import plan
    from sparkgpt.train.config import load_train_config
    from sparkgpt.train.trainer import Trainer

    parallel, checkpointing = MODES[mode]
    config = load_train_config("shakespeare-char", {**SHAPE, "data": str(WORK / "data"), "parallel": parallel,
                                                    "activation_checkpointing": str(checkpointing)})
    trainer = Trainer(config, WORK / parallel / str(checkpointing), progress=False)
    trainer.train_step()  # warm-up: first touch of every buffer, the optimizer state is created
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    peak = plan.measure_peak(trainer.model, trainer.optimizer, trainer.train_step)
    estimate = plan.estimate(trainer.model.config, world_size=trainer.dist.world_size, parallel=parallel,
                             activation_checkpointing=checkpointing, dtype=config.dtype,
                             block_size=config.block_size).peak(config.batch_size)
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(trainer.dist.world_size)]
    torch.distributed.all_gather(peaks, torch.tensor([float(peak)], dtype=torch.float64))
    if trainer.dist.is_main:
        row = {"mode": mode, "tokens_per_s": trainer.tokens_per_step / statistics.median(times),
               "peaks": [int(p.item()) for p in peaks], "estimate": estimate,
               "parameters": trainer.model.num_parameters()}
        (WORK / f"{parallel}-{checkpointing}.json").write_text(json.dumps(row), encoding="utf-8")
    trainer.dist.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode after one warm-up step")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    shutil.rmtree(WORK, ignore_errors=True)
    make_data(WORK / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for mode, (parallel, checkpointing) in MODES.items():
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, "--worker", mode, "--steps", str(args.steps)], check=True, env=env)
        rows.append(json.loads((WORK / f"{parallel}-{checkpointing}.json").read_text(encoding="utf-8")))
    print(f"\nCPU: {hardware.cpu().describe()}")
    print(f"GPT-2-medium shape ({rows[0]['parameters'] / 1e6:.0f}M parameters), 2 CPU processes (gloo), fp32, "
          f"block {SHAPE['block_size']}, micro-batch {SHAPE['batch_size']} per process\n")
    print("| mode | tokens/s | peak memory per rank, measured (rank 0 / rank 1) | planner's estimate | "
          "estimate / measured |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        measured = " / ".join(f"{p / 2**30:.2f} GiB" for p in row["peaks"])
        ratio = row["estimate"] / max(row["peaks"])
        print(f"| {row['mode']} | {row['tokens_per_s']:,.0f} | {measured} | {row['estimate'] / 2**30:.2f} GiB | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
