"""Speculative decoding by prompt lookup: the serving engine with and without drafts, same model, same run.

For each bundled generation task (correction, summarization: the replies repeat much of their input), every test
item's prompt (the task's own, in the model's chat template, as a chat client sends it) is decoded greedily by
two engines over the same weights, one request at a time (a single stream, where a decode step is memory-bound and
checking a draft costs about as much as one token): one with `speculative_tokens=0`, one with the default. Each
prompt goes through both in turn, which one first alternating, so that the machine's drift falls on both alike.
Reported: decode tokens per second of each (the tokens after the first over the time after the first: what
speculation changes; the prompt's prefill is the same work either way), end-to-end tokens per second (prefill
included), their ratios, decode steps per token, and how many replies are equal (goal: all equal, and >= 1.5x
tokens/s).

    python benchmarks/bench_speculative.py [--ref smollm2-135m-instruct] [--quantize int4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import queue
import time
from dataclasses import dataclass, field

import torch

import sparkgpt
from sparkgpt import hardware
from sparkgpt.evaluate.task import load_task
from sparkgpt.generate import SamplingParams
from sparkgpt.serve.engine import Engine


@dataclass
class Run:
    seconds: float = 0.0          # end to end, prefill included
    decode_seconds: float = 0.0   # from each reply's first token to its last
    tokens: int = 0
    steps: int = 0
    texts: list[str] = field(default_factory=list)


def run(engine: Engine, prompt: list[int], params: SamplingParams, result: Run) -> None:
    """One prompt through `engine`, timed from submission and from its first token, added to `result`."""
    steps = engine.steps
    events: queue.SimpleQueue = queue.SimpleQueue()
    start = time.perf_counter()
    engine.submit(prompt, params, events.put)
    first, text, done = None, "", None
    while done is None:
        for event in events.get():
            first = first or time.perf_counter()
            text += event.text
            if event.finish_reason is not None or event.error is not None:
                done = event
    end = time.perf_counter()
    if done.error is not None:
        raise SystemExit(done.error)
    result.seconds += end - start
    result.decode_seconds += end - first
    result.tokens += done.completion_tokens
    result.texts.append(text)
    result.steps += engine.steps - steps


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
            for label in engines:  # warm-up
                for prompt in prompts[:2]:
                    run(engines[label], prompt, params, Run())
            for round_ in range(args.rounds):
                # Each prompt through both engines in turn, the first of them alternating: the machine's drift
                # within a round then falls on both alike.
                results = {label: Run() for label in engines}
                for index, prompt in enumerate(prompts):
                    order = ["plain", "drafts"] if (index + round_) % 2 == 0 else ["drafts", "plain"]
                    for label in order:
                        run(engines[label], prompt, params, results[label])
                plain, drafts = results["plain"], results["drafts"]
                equal = sum(a == b for a, b in zip(plain.texts, drafts.texts, strict=True))
                decode = [(r.tokens - len(prompts)) / r.decode_seconds for r in (plain, drafts)]
                whole = [r.tokens / r.seconds for r in (plain, drafts)]
                row = (name, round_ + 1, len(prompts), plain.tokens / len(prompts), *decode, decode[1] / decode[0],
                       *whole, whole[1] / whole[0], plain.steps / plain.tokens, drafts.steps / drafts.tokens, equal)
                rows.append(row)
                print(f"{name} round {round_ + 1}: decode {row[4]:.1f} -> {row[5]:.1f} tok/s ({row[6]:.2f}x), end to "
                      f"end {row[7]:.1f} -> {row[8]:.1f} tok/s ({row[9]:.2f}x); steps per token {row[10]:.2f} -> "
                      f"{row[11]:.2f}; equal replies {equal}/{len(prompts)}", flush=True)
    finally:
        for engine in engines.values():
            engine.stop()
    print("\n| task | round | items | tokens per reply | decode tok/s plain | drafts | ratio | end-to-end tok/s plain "
          "| drafts | ratio | steps/token plain | drafts | equal replies |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, round_, count, per_reply, *rates, plain_steps, draft_steps, equal in rows:
        print(f"| {name} | {round_} | {count} | {per_reply:.1f} | {rates[0]:.1f} | {rates[1]:.1f} "
              f"| **{rates[2]:.2f}×** | {rates[3]:.1f} | {rates[4]:.1f} | {rates[5]:.2f}× | {plain_steps:.2f} "
              f"| {draft_steps:.2f} | {equal}/{count} |")


if __name__ == "__main__":
    main()
