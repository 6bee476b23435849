"""Before/after: the main speed paths of a git revision beside the working tree, same machine, same run.

For a change that must not slow anything (a refactor), this times, in both source trees, through the public API
only: decode (128 new tokens after a short prompt, greedy and seeded top-p sampling), prefill (a 512-token
prompt), int4 decode on the real SmolLM2-135M-Instruct, eight served requests through the engine, and baby-GPT
training steps (the shakespeare-baby preset). Each measurement runs in a fresh process per tree; the trees
alternate round by round and each keeps its best round, so the machine's drift falls on both alike.

    python benchmarks/bench_compare.py --base REV [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside each tree's interpreter (PYTHONPATH = that tree); prints one JSON object of rates (higher is better).
MEASURE = r'''
import json, sys, time, tempfile, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(int(sys.argv[2]))
import sparkgpt
what, data = sys.argv[1], sys.argv[3]
TEXT = ("The old bridge crossed the river just below the mill, where the water ran fast and cold even in summer. ")

def best(run, repeats=3):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
    return min(times)

result = {}
if what == "generate":
    lm = sparkgpt.load("smollm2-135m-instruct", device="cpu")
    long_ids = lm.encode(TEXT * 40)[:512]
    greedy = best(lambda: lm.generate("Once upon a time", max_new_tokens=128, temperature=0))
    sampled = best(lambda: lm.generate("Once upon a time", max_new_tokens=128, temperature=0.8, top_p=0.9, seed=1,
                                       stop_token_ids=[]))
    prefill = best(lambda: lm.complete([long_ids], max_new_tokens=1, temperature=0))
    result = {"decode fp32 greedy tok/s": 128 / greedy, "decode fp32 top-p tok/s": 128 / sampled,
              "prefill fp32 tok/s": 512 / prefill}
    q = sparkgpt.load("smollm2-135m-instruct", device="cpu", quantize="int4")
    result["decode int4 greedy tok/s"] = 128 / best(lambda: q.generate("Once upon a time", max_new_tokens=128,
                                                                        temperature=0))
elif what == "serve":
    from sparkgpt.generate import SamplingParams
    from sparkgpt.serve.engine import Engine
    lm = sparkgpt.load("smollm2-135m-instruct", device="cpu")
    engine = Engine(lm, max_slots=8).start()
    prompts = [lm.encode(f"Question {i}: tell me about rivers.") for i in range(8)]
    params = SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.9, seed=3)
    def serve_all():
        import threading
        finished, all_done = [0], threading.Event()
        def sink(events):  # runs on the engine thread: it only counts
            finished[0] += sum(1 for e in events if e.finish_reason or e.error)
            if finished[0] == len(prompts):
                all_done.set()
        for ids in prompts:
            engine.submit(ids, params, sink)
        all_done.wait()
    result = {"serve 8×64 tokens tok/s": 8 * 64 / best(serve_all, repeats=2)}
    engine.stop()
elif what == "train":
    from sparkgpt.train import train
    out = Path(tempfile.mkdtemp())
    train("shakespeare-baby", out, {"data": data, "max_steps": "12", "log_every": "1", "eval_every": "1000000",
                                    "eval_batches": "1", "save_every": "1000000"}, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = sorted(r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] > 4)
    result = {"train baby GPT tok/s": rates[len(rates) // 2]}
print(json.dumps(result))
'''


def measure(tree: Path, what: str, threads: int, data: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", MEASURE, what, str(threads), str(data)], env=env, cwd=tree,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_compare: {what} failed in {tree}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=["generate", "serve", "train"])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from sparkgpt import hardware
    from sparkgpt.data import prepare

    print(f"CPU: {hardware.cpu().describe()}; {args.threads} threads")
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
        try:
            data = Path(scratch) / "data"
            prepare(["shakespeare"], data, tokenizer="char", val_fraction=0.1, progress=False)
            trees = {f"base {args.base}": base, "working tree": ROOT}
            best: dict[str, dict[str, float]] = {name: {} for name in trees}
            for round_index in range(args.rounds):
                order = list(trees.items()) if round_index % 2 == 0 else list(trees.items())[::-1]
                for what in args.only:
                    for name, tree in order:
                        for key, value in measure(tree, what, args.threads, data).items():
                            best[name][key] = max(best[name].get(key, 0.0), value)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    (before, after) = best.values()
    print(f"{'':32s} {'base':>10s} {'working':>10s}  ratio")
    for key in before:
        print(f"{key:32s} {before[key]:10.1f} {after[key]:10.1f}  {after[key] / before[key]:.2f}×")


if __name__ == "__main__":
    main()
