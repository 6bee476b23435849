"""Do the decode kernels cost quality? The perplexity of a fixed text fed one token per decode step (what generation
computes: the integer kernels, the cache, the lean step) under each choice of decode kernel: torch's, with bf16
activations, and ours, with 8-bit activations per group of 32 inputs (quant.py, `decode_kernel`); beside it the
prompt path's (the whole text in one forward: dequantised matrices past the rows the kernels were timed faster
for, at most 512, so no decode kernel touches it at more tokens than that).

    python benchmarks/bench_decode_quality.py --weights smollm2-135m-instruct gemma3-270m --tokens 1024

The text: the passages of the bundled summarisation task, in order. Each model is loaded as `sparkgpt.load(...,
quantize="int4")` gives it (a GGUF file's own 5-, 6- and 8-bit matrices stay int8: both kernels run).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import sparkgpt
from sparkgpt import hardware
from sparkgpt.model import KVCache, quant
from sparkgpt.model.decode import decode_step

PASSAGES = Path(sparkgpt.__file__).parent / "evaluate" / "tasks" / "data" / "summarization.jsonl"


def text() -> str:
    rows = [json.loads(line) for line in PASSAGES.read_text().splitlines() if line.strip()]
    return "\n\n".join(str(row.get("input") or row.get("text") or row.get("document")) for row in rows)


@torch.inference_mode()
def decode_perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """exp(mean NLL) of ids[1:] with each token fed by its own decode step."""
    step = decode_step(model)
    assert step is not None, "the model needs the general forward: no lean decode step to measure"
    cache = KVCache(model.config, 1, ids.numel(), torch.float32, torch.device("cpu"))
    total = 0.0
    for t in range(ids.numel() - 1):
        logits = step(ids[t:t + 1], torch.tensor([t]), cache, None).float()
        total += torch.nn.functional.cross_entropy(logits, ids[t + 1:t + 2]).item()
    return math.exp(total / (ids.numel() - 1))


@torch.inference_mode()
def prompt_perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    logits = model(ids[None])[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[1:]).exp().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {hardware.cpu().describe()}")
    print("| model | tokens | prompt path | decode, torch's kernels | decode, ours | ours / torch's |")
    print("|---|---:|---:|---:|---:|---:|")
    for weights in args.weights:
        results = {}
        for kernel in ("torch", "native"):
            quant._DECODE_KERNELS.clear()
            quant._DECODE_KERNELS.update(int4=f"int4 {kernel}", int8=f"int8 {kernel}")
            lm = sparkgpt.load(weights, device="cpu", quantize="int4")
            ids = torch.tensor(lm.tokenizer.encode(text())[:args.tokens])
            kernels = sorted({module.kernel_name for module in lm.model.modules()
                              if isinstance(module, quant.QuantizedLinear) and not module.quantize_activations})
            assert all(name.endswith(kernel) for name in kernels), kernels
            results[kernel] = decode_perplexity(lm.model, ids)
            results["prompt"] = prompt_perplexity(lm.model, ids)
        print(f"| {weights} | {ids.numel()} | {results['prompt']:.3f} | {results['torch']:.3f} | "
              f"{results['native']:.3f} | {results['native'] / results['torch']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
