"""The prepared GPU check (run by benchmarks/gpu_check.sh; never part of the tests): four parts, each beside a
reference measured in the same run, in about 6 minutes on one H100.

1. CUDA parity: random-init transformers GPT-2 and Llama (grouped-query heads) loaded by sparkgpt: float32 logits
   within 1e-4 of transformers' (TF32 off), and bf16 logits as close to the float32 ones as transformers' own bf16.
2. Training: GPT-2 124M (the `gpt2` preset: nanoGPT's model) for `--train-steps` steps with sparkgpt's trainer
   (bf16, compile, fused AdamW, flash SDPA) beside transformers' GPT2LMHeadModel in a plain PyTorch loop with the
   same settings (nanoGPT's train.py recipe: bf16 autocast, torch.compile, fused AdamW, SDPA): tokens/s and MFU
   against the GPU's datasheet bf16 peak, on Shakespeare tokenised with a 50,304-entry BPE.
3. Decode: a SmolLM2-135M-shaped model (random weights; the real GGUF is too large to carry to a lent GPU) in bf16,
   128 greedy tokens after a 16-token prompt, sparkgpt against transformers `generate`; float32 greedy tokens equal.
4. FSDP2 with torch.compile on one device through torchrun: a few steps of the sparkgpt-124m preset, a sharded
   checkpoint written.

    python benchmarks/gpu_check.py [--device cuda] [--train-steps 300] [--smoke]

`--smoke --device cpu` runs every part at toy sizes, to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import sparkgpt
from sparkgpt import hardware
from sparkgpt.checkpoint.hf import config_to_hf, state_dict_to_hf
from sparkgpt.data import prepare
from sparkgpt.data.tokens import TokenData, gather, step_offsets
from sparkgpt.generate import SamplingParams, token_steps
from sparkgpt.tokenizer import Tokenizer
from sparkgpt.train import train
from sparkgpt.train.trainer import flops_per_token, peak_flops

WORK = Path("runs/gpu-check")
TEXT = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question."] * 50


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


# ---- 1. parity ------------------------------------------------------------------------------------------------

def parity(device: torch.device, lines: list[str]) -> bool:
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tokenizer = Tokenizer.train_bpe(TEXT, 300)
    families = {
        "gpt2": transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=128, n_layer=3, n_head=4,
                                        n_positions=256, bos_token_id=None, eos_token_id=None),
        "llama": transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=192, intermediate_size=384,
                                          num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                                          max_position_embeddings=256, tie_word_embeddings=False,
                                          bos_token_id=None, eos_token_id=None),
    }
    ok = True
    ids = torch.randint(0, tokenizer.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0)).to(device)
    for name, config in families.items():
        torch.manual_seed(0)
        reference = transformers.AutoModelForCausalLM.from_config(config).eval()
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder)
            tokenizer.save(Path(folder))
            ours32 = sparkgpt.load(folder, dtype="float32", device=device).model
            ours16 = sparkgpt.load(folder, dtype="bfloat16", device=device).model
        reference = reference.to(device)
        with torch.no_grad():
            expected = reference(ids).logits.float()
            gap = (ours32(ids).float() - expected).abs().max().item()
            theirs_bf16 = relative_error(reference.to(torch.bfloat16)(ids).logits, expected)
            ours_bf16 = relative_error(ours16(ids), expected)
        passed = gap <= 1e-4 and ours_bf16 <= 1.5 * theirs_bf16 + 1e-3
        ok &= passed
        lines.append(f"parity {name:5s} on {device.type}: fp32 max |Δlogit| {gap:.2e} (≤ 1e-4); bf16 relative "
                     f"error {ours_bf16:.4f} vs transformers' bf16 {theirs_bf16:.4f}: {'ok' if passed else 'FAILED'}")
    return ok


# ---- 2. training ----------------------------------------------------------------------------------------------

def train_gpt2(device: torch.device, steps: int, smoke: bool, lines: list[str]) -> None:
    import transformers

    data = WORK / "data"
    if not (data / "meta.json").is_file():
        if smoke:
            (WORK / "corpus.txt").parent.mkdir(parents=True, exist_ok=True)
            (WORK / "corpus.txt").write_text("\n".join(TEXT * 40), encoding="utf-8")
        prepare([WORK / "corpus.txt" if smoke else "shakespeare"], data, tokenizer="bpe:512" if smoke else
                "bpe:50304", val_fraction=0.05, progress=False)
    vocab = TokenData(data).vocab_size
    batch, block = (2, 64) if smoke else (16, 1024)
    toy = {"n_layers": 2, "d_model": 64, "n_heads": 2, "n_kv_heads": 2}
    shape = {f"model.{key}": str(value) for key, value in toy.items()} if smoke else {}
    settings = {"data": str(data), "max_steps": str(steps), "batch_size": str(batch), "block_size": str(block),
                "grad_accum": "1", "warmup_steps": "20", "eval_every": "1000000", "eval_batches": "1",
                "save_every": "1000000", "log_every": "10", "compile": "true", "dtype": "bfloat16",
                "device": device.type, **shape}
    shutil.rmtree(WORK / "gpt2-sparkgpt", ignore_errors=True)
    start = time.perf_counter()
    run = train("gpt2", WORK / "gpt2-sparkgpt", settings, progress=False)
    ours_wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    measured = sorted(r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] > 20)
    ours_rate = measured[len(measured) // 2] if measured else float("nan")

    # The reference: transformers' GPT-2 in nanoGPT's loop (bf16 autocast, compile, fused AdamW), the same windows.
    config = sparkgpt.preset("gpt2").replace(vocab_size=vocab, max_seq_len=block, **(toy if smoke else {}))
    torch.manual_seed(1337)
    model = transformers.GPT2LMHeadModel(config_to_hf_gpt2(config)).to(device)
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    forward = torch.compile(model)
    tokens = TokenData(data).train
    times = []
    start = time.perf_counter()
    for step in range(steps):
        inputs, targets = gather(tokens, step_offsets(len(tokens), block, 1337, step, batch), block)
        inputs, targets = inputs.to(device), targets.to(device)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - began)
    theirs_wall = time.perf_counter() - start
    steady = sorted(times[20:] or times)
    theirs_rate = batch * block / steady[len(steady) // 2]
    # One MFU formula for both (the same model shape): tokens/s × FLOPs per token / the bf16 peak
    flops, peak = flops_per_token(sparkgpt.GPT(config), block), peak_flops(device, torch.bfloat16, None)
    ours_mfu, theirs_mfu = ours_rate * flops / peak, theirs_rate * flops / peak
    lines += [
        f"train GPT-2 124M ({'toy' if smoke else '124M'}, vocab {vocab}, batch {batch} × {block}, {steps} steps, bf16, "
        f"compile):",
        f"  transformers GPT2LMHeadModel, nanoGPT's loop: {theirs_rate:12,.0f} tok/s  MFU {theirs_mfu:.1%}  "
        f"(wall {theirs_wall:.0f} s with compile)",
        f"  sparkgpt trainer, gpt2 preset:               {ours_rate:12,.0f} tok/s  MFU {ours_mfu:.1%}  "
        f"(wall {ours_wall:.0f} s with compile; final loss {run.train_loss:.3f})",
        f"  ratio: {ours_rate / theirs_rate:.2f}×",
    ]


def config_to_hf_gpt2(config: sparkgpt.ModelConfig):
    import transformers

    return transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_seq_len,
                                   n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads,
                                   bos_token_id=None, eos_token_id=None)


# ---- 3. decode ------------------------------------------------------------------------------------------------

def decode(device: torch.device, smoke: bool, lines: list[str]) -> None:
    import transformers

    config = sparkgpt.preset("smollm2-135m")
    if smoke:
        config = config.replace(n_layers=2)
    torch.manual_seed(0)
    ours32 = sparkgpt.GPT(config).eval()
    fields = config_to_hf(config, torch.float32)
    reference = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(fields.pop("model_type"), **fields), attn_implementation="sdpa").eval()
    missing, unexpected = reference.load_state_dict(state_dict_to_hf(ours32.state_dict(), config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # the head is tied
    prompt = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    new = 32 if smoke else 128
    results = {dtype: timed_greedy(ours32.to(device=device, dtype=dtype), reference.to(device=device, dtype=dtype),
                                   prompt.to(device), new, device) for dtype in (torch.float32, torch.bfloat16)}
    for dtype, (ours_rate, theirs_rate, same) in results.items():
        lines.append(f"decode SmolLM2-135M shape, {str(dtype).removeprefix('torch.')}, batch 1, {new} tokens: "
                     f"sparkgpt {ours_rate:,.0f} tok/s, transformers {theirs_rate:,.0f} tok/s "
                     f"({ours_rate / theirs_rate:.2f}×); greedy tokens equal for {same} of {new}")


@torch.inference_mode()
def timed_greedy(ours: sparkgpt.GPT, theirs, ids: torch.Tensor, new: int, device: torch.device):
    """(our tokens/s, transformers' tokens/s, how many greedy tokens agree before the first difference), the best
    of three rounds taken in turn after a warm-up of each."""
    params = SamplingParams(max_new_tokens=new, temperature=0)

    def run_ours() -> list[int]:
        return [int(step[0]) for step in token_steps(ours, [ids[0].tolist()], params)]

    def run_theirs() -> list[int]:
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)
        synchronize(device)
        return out[0, ids.shape[1]:].tolist()

    runs = {"ours": run_ours, "theirs": run_theirs}
    outputs = {name: run() for name, run in runs.items()}  # warm-up
    best = dict.fromkeys(runs, math.inf)
    for _ in range(3):
        for name, run in runs.items():
            synchronize(device)
            began = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - began)
    same = next((i for i, (a, b) in enumerate(zip(outputs["ours"], outputs["theirs"], strict=False)) if a != b), new)
    return new / best["ours"], new / best["theirs"], same


# ---- 4. FSDP2 + compile ---------------------------------------------------------------------------------------

def fsdp(device: torch.device, smoke: bool, lines: list[str]) -> bool:
    out = WORK / "fsdp"
    shutil.rmtree(out, ignore_errors=True)
    settings = {"parallel": "fsdp", "compile": "true", "max_steps": "20", "batch_size": "4",
                "block_size": "64" if smoke else "512", "eval_every": "10", "eval_batches": "2", "save_every": "20",
                "log_every": "5", "device": device.type, "warmup_steps": "5"}
    if smoke:
        settings.update({"model.n_layers": "2", "model.d_model": "64", "model.n_heads": "2", "model.n_kv_heads": "1",
                         "model.d_ff": "128"})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "sparkgpt.cli", "train", "--config", "sparkgpt-124m", "--data", str(WORK / "data"), "--out", str(out),
               "--quiet", *[f"--{key}={value}" for key, value in settings.items()]]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()] if (out / "metrics.jsonl").is_file() else []
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    passed = result.returncode == 0 and len(losses) >= 2 and losses[-1] < losses[0]
    lines.append(f"FSDP2 + compile, 1 process on {device.type}: {'ok' if passed else 'FAILED'} "
                 f"(loss {losses[0] if losses else float('nan'):.3f} -> {losses[-1] if losses else float('nan'):.3f}, "
                 f"{time.perf_counter() - started:.0f} s)")
    if not passed:
        lines.append("  " + (result.stderr or result.stdout)[-1500:].replace("\n", "\n  "))
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="toy sizes (checks the script, e.g. on a CPU)")
    parser.add_argument("--parts", default="parity,train,decode,fsdp")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --device cpu --smoke to check the script)")
    WORK.mkdir(parents=True, exist_ok=True)
    lines = [f"CPU: {hardware.cpu().describe()}", "GPU: " + ("; ".join(hardware.gpus()) or "none"),
             f"torch {torch.__version__}, CUDA {torch.version.cuda}"]
    parts = args.parts.split(",")
    ok = True
    for part in parts:
        began = time.perf_counter()
        if part == "parity":
            ok &= parity(device, lines)
        elif part == "train":
            train_gpt2(device, 30 if args.smoke else args.train_steps, args.smoke, lines)
        elif part == "decode":
            decode(device, args.smoke, lines)
        elif part == "fsdp":
            if not (WORK / "data" / "meta.json").is_file():
                train_gpt2(device, 2, args.smoke, [])  # prepares the data
            ok &= fsdp(device, args.smoke, lines)
        print(f"[{part} done in {time.perf_counter() - began:.0f} s]", file=sys.stderr, flush=True)
    print("\n".join(lines), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
