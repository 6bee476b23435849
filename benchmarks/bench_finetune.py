"""Fine-tuning SmolLM2-135M on this CPU: sparkgpt beside transformers (+ PEFT for LoRA) measured in the same run.

For each of full fine-tuning and LoRA (rank 8 on q, k, v, o), in fp32 and bf16: training tokens/s (median step
after warm-up; a step = forward, backward and AdamW update on 8 sequences of 128 tokens), the peak resident memory
while training, and the trainable parameters. sparkgpt runs its real trainer (`sparkgpt.finetune` on a prepared
token folder); the reference is a plain transformers training loop on the same weights, batch shape, optimizer
(fused AdamW) and precision (bf16: autocast, and for LoRA the frozen weights stored in bf16 too). Each
configuration runs in its own process, so its memory figure is its own.

    .venv/bin/python benchmarks/bench_finetune.py [--steps 8] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from sparkgpt import hardware
from sparkgpt.data import TokenData

WORK = Path("runs/bench-finetune")
BASE = WORK / "smollm2-fp32"
DATA = WORK / "data"
BATCH, BLOCK, RANK, ALPHA = 8, 128, 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONFIGS = [f"{who}-{method}-{dtype}" for method in ("full", "lora") for dtype in ("fp32", "bf16")
           for who in ("sparkgpt", "transformers")]


class PeakRSS:
    """The largest resident set size seen while running (sampled every 5 ms from /proc)."""

    def __init__(self) -> None:
        self.peak, self._running = 0, True
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self._running:
            with open("/proc/self/statm") as handle:
                self.peak = max(self.peak, int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()


def prepare_inputs() -> None:
    """SmolLM2 as an fp32 checkpoint directory (both sides load the same files), and Shakespeare tokenised with it."""
    import sparkgpt
    from sparkgpt.data import prepare

    if not (BASE / "model.safetensors").is_file():
        sparkgpt.load("smollm2-135m-instruct", device="cpu").save(BASE)
    if not (DATA / "meta.json").is_file():
        prepare(["shakespeare"], DATA, tokenizer=str(BASE), val_fraction=0.05)


def sparkgpt_worker(method: str, dtype: str, steps: int) -> dict:
    from sparkgpt.model.lora import trainable_parameters
    from sparkgpt.train import finetune
    from sparkgpt.train.trainer import Trainer

    out = WORK / f"run-{method}-{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    trainable = {}
    original = Trainer.run

    def run(self):  # count what trains, then train while sampling memory
        trainable["n"] = trainable_parameters(self.model)
        with PeakRSS() as rss:
            result = original(self)
        trainable["rss"] = rss.peak
        return result

    Trainer.run = run
    finetune(BASE, DATA, out, method=method, overrides={
        "block_size": BLOCK, "batch_size": BATCH, "max_steps": steps, "epochs": None, "log_every": 1,
        "eval_every": 10**6, "save_every": 10**6, "eval_batches": 1, "dtype": "bfloat16" if dtype == "bf16" else
        "float32", "base_dtype": "bfloat16" if dtype == "bf16" and method == "lora" else "float32",
        "lora_rank": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, "lora_targets": ",".join(TARGETS)},
        progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] > 2]
    shutil.rmtree(out, ignore_errors=True)
    return {"tokens_per_s": statistics.median(speeds), "peak_rss": trainable["rss"], "trainable": trainable["n"]}


def transformers_worker(method: str, dtype: str, steps: int) -> dict:
    import numpy as np
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    if method == "lora":
        import peft

        if dtype == "bf16":
            model.to(torch.bfloat16)
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                           target_modules=TARGETS))
        for param in model.parameters():  # the adapters train in fp32, as sparkgpt's do
            if param.requires_grad:
                param.data = param.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    tokens = TokenData(DATA).train
    rng = np.random.default_rng(0)
    times = []
    with PeakRSS() as rss:
        for _ in range(steps):
            starts = rng.integers(0, len(tokens) - BLOCK - 1, size=BATCH)
            rows = torch.from_numpy(np.stack([np.asarray(tokens[s:s + BLOCK + 1], dtype=np.int64) for s in starts]))
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                logits = model(rows[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    speeds = [BATCH * BLOCK / t for t in times[2:]]
    trainable = sum(p.numel() for p in params)
    return {"tokens_per_s": statistics.median(speeds), "peak_rss": rss.peak, "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", choices=CONFIGS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        who, method, dtype = args.worker.split("-")
        worker = sparkgpt_worker if who == "sparkgpt" else transformers_worker
        print("RESULT " + json.dumps(worker(method, dtype, args.steps)))
        return
    prepare_inputs()
    results = {}
    for name in args.only or CONFIGS:
        done = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps)],
                              capture_output=True, text=True, check=False)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(line.removeprefix("RESULT "))
        print(name, results[name], flush=True)
    print(f"\nCPU: {hardware.cpu().describe()}")
    print(f"SmolLM2-135M, batch {BATCH} x {BLOCK} tokens, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'configuration':<16}{'sparkgpt tok/s':>16}{'transformers':>14}{'ratio':>8}{'sparkgpt peak':>15}"
          f"{'transformers':>14}{'trainable':>12}")
    for method in ("full", "lora"):
        for dtype in ("fp32", "bf16"):
            ours, theirs = results.get(f"sparkgpt-{method}-{dtype}"), results.get(f"transformers-{method}-{dtype}")
            if not ours or not theirs:
                continue
            print(f"{method + ' ' + dtype:<16}{ours['tokens_per_s']:>16,.0f}{theirs['tokens_per_s']:>14,.0f}"
                  f"{ours['tokens_per_s'] / theirs['tokens_per_s']:>7.2f}x{ours['peak_rss'] / 2**30:>13.2f} G"
                  f"{theirs['peak_rss'] / 2**30:>12.2f} G{ours['trainable']:>12,}")
            if ours["trainable"] != theirs["trainable"]:
                print(f"  note: trainable parameters differ (transformers: {theirs['trainable']:,})")


if __name__ == "__main__":
    main()
