"""Speculative decoding by prompt lookup: the serving engine with and without drafts, same model, same run.

For each bundled generation task (correction, summarization: the replies repeat much of their input), every test
item's prompt (the task's own, in the model's chat template, as a chat client sends it) is decoded greedily by
two engines over the same weights, one request at a time (a single stream, where a decode step is memory-bound and
checking a draft costs about as much as one token): one with `speculative_tokens=0`, one with the default. The
rounds alternate the two. Reported: generated tokens per second of each, their ratio, decode steps per token, and
how many replies are equal (goal: all equal, and >= 1.5x tokens/s).

    python benchmarks/bench_speculative.py [--ref smollm2-135m-instruct] [--quantize int4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import sparkgpt
from sparkgpt import hardware
from sparkgpt.evaluate.task import load_task
from sparkgpt.generate import SamplingParams
from sparkgpt.serve.engine import Engine


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int, int, list[str]]:
    """(seconds, generated tokens, decode steps, texts) for the prompts one after another."""
    steps, tokens, texts = engine.steps, 0, []
    start = time.perf_counter()
    for prompt in prompts:
        reply = engine.generate(prompt, params)[0]
        tokens += len(reply.token_ids)
        texts.append(reply.text)
    return time.perf_counter() - start, tokens, engine.steps - steps, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="smollm2-135m-instruct")
    parser.add_argument("--quantize", choices=["int8", "int4", "none"], default="int4")
    parser.add_argument("--tasks", nargs="+", default=["correction", "summarization"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: every test item)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {hardware.cpu().describe()}", flush=True)
    lm = sparkgpt.load(args.ref, device="cpu", quantize=None if args.quantize == "none" else args.quantize)
    engines = {"plain": Engine(lm, max_slots=1, speculative_tokens=0, prefix_cache_bytes=0).start(),
               "drafts": Engine(lm, max_slots=1, prefix_cache_bytes=0).start()}
    print(f"{args.ref} ({args.quantize}), {torch.get_num_threads()} threads, one request at a time", flush=True)
    rows = []
    try:
        for name in args.tasks:
            task = load_task(name)
            items = task.items[:args.limit] if args.limit else task.items
            prompts = [lm.chat_prompt([{"role": "user", "content": task.context(item, [])}]) for item in items]
            params = SamplingParams(max_new_tokens=task.max_new_tokens, temperature=0, stop=task.stop)
            run(engines["plain"], prompts[:2], params)  # warm-up
            run(engines["drafts"], prompts[:2], params)
            for round_ in range(args.rounds):
                order = ["plain", "drafts"] if round_ % 2 == 0 else ["drafts", "plain"]
                results = {label: run(engines[label], prompts, params) for label in order}
                (plain_s, plain_tokens, plain_steps, plain_texts) = results["plain"]
                (draft_s, draft_tokens, draft_steps, draft_texts) = results["drafts"]
                equal = sum(a == b for a, b in zip(plain_texts, draft_texts, strict=True))
                row = (name, round_ + 1, len(prompts), plain_tokens / plain_s, draft_tokens / draft_s,
                       (draft_tokens / draft_s) / (plain_tokens / plain_s), plain_steps / plain_tokens,
                       draft_steps / draft_tokens, equal)
                rows.append(row)
                print(f"{name} round {round_ + 1}: plain {row[3]:.1f} tok/s, drafts {row[4]:.1f} tok/s "
                      f"({row[5]:.2f}x); steps per token {row[6]:.2f} / {row[7]:.2f}; equal replies {equal}/"
                      f"{len(prompts)}", flush=True)
    finally:
        for engine in engines.values():
            engine.stop()
    print("\n| task | round | items | plain tok/s | drafts tok/s | ratio | steps/token plain | steps/token drafts "
          "| equal replies |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, round_, count, plain, drafts, ratio, plain_steps, draft_steps, equal in rows:
        print(f"| {name} | {round_} | {count} | {plain:.1f} | {drafts:.1f} | **{ratio:.2f}×** | {plain_steps:.2f} | "
              f"{draft_steps:.2f} | {equal}/{count} |")


if __name__ == "__main__":
    main()
