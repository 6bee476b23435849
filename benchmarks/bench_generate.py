"""Generation speed: sparkgpt beside transformers, same weights, same machine, same run.

Weights: the real SmolLM2-135M-Instruct (`--weights smollm2-135m-instruct`, the default: the Q4_1 GGUF
dequantised, handed to both) or a random-init model of the same shape (`--weights random`: 30 layers, 576 wide,
9 heads, 3 key/value heads, vocab 49,152). Prefill: time to the first new token for a 512-token prompt.
Decode: new tokens per second at batch 1, 128 tokens after a 16-token prompt (total time minus that prefill).
Quantised rows (`sparkgpt.model.quant`, int8 and int4 from the same float weights; float32 activations, and
bfloat16 ones marked /bf16) are compared with transformers fp32 for decode and transformers bf16 for prefill (the
issue's goals), beside their perplexity on a fixed text. For a GGUF file, `int4-file` is what loading it with
`quantize="int4"` gives: its 4-bit blocks as int4, the matrices it keeps at more bits as int8.
Where `make test` has installed it (tools/llama_cpp), llama.cpp itself runs the same prompts on the GGUF file.

    python benchmarks/bench_generate.py [--weights smollm2-135m-instruct|random] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import sparkgpt
from sparkgpt import hardware
from sparkgpt.checkpoint.hf import config_to_hf, state_dict_to_hf
from sparkgpt.checkpoint.registry import resolve
from sparkgpt.generate import SamplingParams, token_steps
from sparkgpt.model.quant import quantize_model

LLAMA_CPP = Path(__file__).parent.parent / "tools" / "llama_cpp"
# A fixed text for the quality column (plain prose written for this benchmark).
TEXT = ("The old bridge crossed the river just below the mill, where the water ran fast and cold even in summer. "
        "Children from the village came to fish there after school, and their parents warned them every spring "
        "about the current. One year the council decided to build a new bridge of steel and concrete a mile "
        "upstream, and the old one was closed. For a while nobody used it, and moss grew between its stones. "
        "Then a group of neighbours cleared the path, repaired the railings, and planted flowers along the bank.")


def measure_in_rounds(implementations: dict[str, tuple[object, Callable]], rounds: int) -> dict[str, tuple]:
    """{name: (prefill tokens/s on 512 tokens, decode tokens/s for 128 tokens)}, each the best of `rounds`.

    Every implementation is timed once per round, in turn, so that the machine's drift (up to 2× within an hour
    on this shared machine) falls on all of them alike rather than on whichever ran last."""
    long_prompt, short_prompt = prompts()
    jobs = {name: [make_run(model, long_prompt, 1), make_run(model, short_prompt, 1),
                   make_run(model, short_prompt, 129)] for name, (model, make_run) in implementations.items()}
    for runs in jobs.values():
        for run in runs:
            run()  # warm-up: first-call allocations, kernel selection, the native build
    best = {name: [float("inf")] * 3 for name in jobs}
    for _ in range(rounds):
        for name, runs in jobs.items():
            for i, run in enumerate(runs):
                start = time.perf_counter()
                run()
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: (512 / prefill, 128 / (whole - first)) for name, (prefill, first, whole) in best.items()}


def ours(model: sparkgpt.GPT, prompt: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    return lambda: list(token_steps(model, [prompt[0].tolist()], params))


def theirs(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    mask = torch.ones_like(prompt)
    return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """The 512-token prompt of the prefill figure and the 16-token prompt of the decode figure (random ids)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 49152, (1, 512), generator=generator), torch.randint(0, 49152, (1, 16), generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each figure is the best of them")
    parser.add_argument("--weights", default="smollm2-135m-instruct", help="a model reference, or 'random'")
    parser.add_argument("--llama-native", action="store_true",
                        help="also llama.cpp built from source for this CPU (llama_cpp_native.py; builds it once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    if args.weights == "random":
        config = sparkgpt.preset("smollm2-135m")
        torch.manual_seed(0)
        model = sparkgpt.GPT(config).eval()
        # Random ids for random weights: their perplexity only shows that quantisation changes little.
        text_ids = torch.randint(0, config.vocab_size, (128,), generator=torch.Generator().manual_seed(1)).tolist()
    else:
        lm = sparkgpt.load(args.weights, device="cpu")
        model, config, text_ids = lm.model, lm.config, lm.tokenizer.encode(TEXT)
    hf_fields = config_to_hf(config, torch.float32)
    reference = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(hf_fields.pop("model_type"), **hf_fields), attn_implementation="sdpa"
    ).eval()
    missing, unexpected = reference.load_state_dict(state_dict_to_hf(model.state_dict(), config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied
    probe = torch.randint(0, config.vocab_size, (1, 32))
    with torch.no_grad():  # the same weights: the same logits
        torch.testing.assert_close(model(probe), reference(probe).logits, atol=1e-4, rtol=0)

    # float32 activations (the default) and bfloat16 ones (dtype="bfloat16": the faster prefill) for each method
    quantized = {f"{method}{suffix}": quantize_model(copy.deepcopy(model).to(dtype), method)
                 for method in ("int8", "int4") for suffix, dtype in (("", torch.float32), ("/bf16", torch.bfloat16))}
    gguf_file = resolve(args.weights) if args.weights != "random" else None
    if gguf_file and gguf_file.suffix == ".gguf":
        # What a user loading the file gets: its 4-bit blocks as int4, the matrices it keeps at more bits as int8.
        quantized["int4-file"] = sparkgpt.load(args.weights, device="cpu", quantize="int4").model
    text = torch.tensor([text_ids])
    quality = {name: perplexity(m, text) for name, m in (("float32", model), *quantized.items())}

    print(f"CPU: {hardware.cpu().describe()}")
    print(f"weights {args.weights}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, best of {args.repeats} rounds")
    implementations = {
        "float32 transformers": (reference, theirs), "float32 sparkgpt": (model, ours),
        "bfloat16 transformers": (copy.deepcopy(reference).to(torch.bfloat16), theirs),
        "bfloat16 sparkgpt": (copy.deepcopy(model).to(torch.bfloat16), ours),
        **{f"{method} sparkgpt": (m, ours) for method, m in quantized.items()},
    }
    figures = measured = measure_in_rounds(implementations, args.repeats)
    print(f"{'dtype':<11}{'':<14}{'prefill tok/s':>14}{'decode tok/s':>14}{'perplexity':>12}")
    for dtype in ("float32", "bfloat16"):
        rows = [figures[f"{dtype} transformers"], figures[f"{dtype} sparkgpt"]]
        for name, row in zip(("transformers", "sparkgpt"), rows, strict=True):
            extra = f"{quality['float32']:>12.3f}" if name == "sparkgpt" and dtype == "float32" else ""
            print(f"{dtype:<11}{name:<14}{row[0]:>14.0f}{row[1]:>14.1f}{extra}")
        print(f"{'':<11}{'ratio':<14}{rows[1][0] / rows[0][0]:>13.2f}x{rows[1][1] / rows[0][1]:>13.2f}x")
    prefill_reference, decode_reference = figures["bfloat16 transformers"][0], figures["float32 transformers"][1]
    for method in quantized:
        prefill, decode = figures[f"{method} sparkgpt"]
        print(f"{method:<11}{'sparkgpt':<14}{prefill:>14.0f}{decode:>14.1f}{quality[method]:>12.3f}")
        print(f"{'':<11}{'ratio':<14}{prefill / prefill_reference:>13.2f}x{decode / decode_reference:>13.2f}x"
              "   (prefill vs transformers bf16, decode vs fp32)")
    figures = llama_cpp(gguf_file, args.threads, args.repeats) if gguf_file and gguf_file.suffix == ".gguf" else None
    if figures:  # the file's own weights (Q4_1 for the default), not re-quantised
        print(f"{'gguf':<11}{'llama.cpp':<14}{figures[0]:>14.0f}{figures[1]:>14.1f}")
        print(f"{'':<11}{'ratio':<14}{figures[0] / prefill_reference:>13.2f}x"
              f"{figures[1] / decode_reference:>13.2f}x   (as above)")
    if args.llama_native and gguf_file and gguf_file.suffix == ".gguf":
        from llama_cpp_native import bench  # beside this file

        native = bench(gguf_file, args.threads, args.repeats)
        int4 = measured["int4 sparkgpt"]
        print(f"{'gguf':<11}{'llama-bench':<14}{native['prefill_tok_s']:>14.0f}{native['decode_tok_s']:>14.1f}"
              f"   (llama.cpp built here with -march=native: pp512, tg128"
              f"{'' if native['repack'] else '; --repack 0, its AMX repacking crashed here'})")
        print(f"{'':<11}{'int4 / it':<14}{int4[0] / native['prefill_tok_s']:>13.2f}x"
              f"{int4[1] / native['decode_tok_s']:>13.2f}x   (sparkgpt int4, float32 activations)")
        own = measured["int4-file sparkgpt"]
        print(f"{'':<11}{'file / it':<14}{own[0] / native['prefill_tok_s']:>13.2f}x"
              f"{own[1] / native['decode_tok_s']:>13.2f}x   (sparkgpt int4 keeping the file's choices)")


def llama_cpp(gguf_file: Path, threads: int, repeats: int) -> tuple[float, float] | None:
    """llama.cpp's (prefill, decode) tokens/s on the same prompts (tools/llama_cpp/speed.mjs through node-llama-cpp's
    prebuilt CPU build, which `make test` installs), or None where it is not installed."""
    if shutil.which("node") is None or not (LLAMA_CPP / "node_modules" / "node-llama-cpp").is_dir():
        return None
    long_prompt, short_prompt = prompts()
    spec = json.dumps({"long": long_prompt[0].tolist(), "short": short_prompt[0].tolist(), "new_tokens": 128})
    result = subprocess.run(["node", str(LLAMA_CPP / "speed.mjs"), str(gguf_file), str(threads), str(repeats), spec],
                            capture_output=True, text=True, check=True, timeout=900)
    figures = json.loads(result.stdout)
    return figures["prefill_tok_s"], figures["decode_tok_s"]


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    logits = model(ids)[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp().item()



if __name__ == "__main__":
    main()
