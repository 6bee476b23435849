"""Generation speed: sparkgpt beside transformers, same weights, same machine, same run.

Weights: the real SmolLM2-135M-Instruct (`--weights smollm2-135m-instruct`, the default: the Q4_1 GGUF
dequantised, handed to both) or a random-init model of the same shape (`--weights random`: 30 layers, 576 wide,
9 heads, 3 key/value heads, vocab 49,152). Prefill: time to the first new token for a 512-token prompt.
Decode: new tokens per second at batch 1, 128 tokens after a 16-token prompt (total time minus that prefill).

    python benchmarks/bench_generate.py [--weights smollm2-135m-instruct|random] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import sparkgpt
from sparkgpt.checkpoint.hf import config_to_hf, state_dict_to_hf
from sparkgpt.generate import SamplingParams, token_steps


def best_time(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def ours(model: sparkgpt.GPT, prompt: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    return lambda: list(token_steps(model, [prompt[0].tolist()], params))


def theirs(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    mask = torch.ones_like(prompt)
    return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False)


def measure(make_run, model, repeats: int) -> tuple[float, float]:
    """(prefill tokens/s on 512 tokens, decode tokens/s for 128 tokens)."""
    generator = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(0, 49152, (1, 512), generator=generator)
    short_prompt = torch.randint(0, 49152, (1, 16), generator=generator)
    prefill = best_time(make_run(model, long_prompt, 1), repeats)
    first = best_time(make_run(model, short_prompt, 1), repeats)
    whole = best_time(make_run(model, short_prompt, 129), repeats)
    return 512 / prefill, 128 / (whole - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default="smollm2-135m-instruct", help="a model reference, or 'random'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    if args.weights == "random":
        config = sparkgpt.preset("smollm2-135m")
        torch.manual_seed(0)
        model = sparkgpt.GPT(config).eval()
    else:
        model = sparkgpt.load(args.weights, device="cpu").model
        config = model.config
    hf_fields = config_to_hf(config, torch.float32)
    reference = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(hf_fields.pop("model_type"), **hf_fields), attn_implementation="sdpa"
    ).eval()
    missing, unexpected = reference.load_state_dict(state_dict_to_hf(model.state_dict(), config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied
    probe = torch.randint(0, config.vocab_size, (1, 32))
    with torch.no_grad():  # the same weights: the same logits
        torch.testing.assert_close(model(probe), reference(probe).logits, atol=1e-4, rtol=0)

    print(f"weights {args.weights}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads")
    print(f"{'dtype':<9}{'':<14}{'prefill tok/s':>14}{'decode tok/s':>14}")
    for dtype in (torch.float32, torch.bfloat16):
        rows = {}
        for name, m, make_run in (("transformers", reference, theirs), ("sparkgpt", model, ours)):
            m.to(dtype)
            rows[name] = measure(make_run, m, args.repeats)
            print(f"{str(dtype).removeprefix('torch.'):<9}{name:<14}{rows[name][0]:>14.0f}{rows[name][1]:>14.1f}")
        ratio = [a / b for a, b in zip(rows["sparkgpt"], rows["transformers"], strict=True)]
        print(f"{'':<9}{'ratio':<14}{ratio[0]:>13.2f}x{ratio[1]:>13.2f}x")



if __name__ == "__main__":
    main()
