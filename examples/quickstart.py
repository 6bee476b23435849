"""Quick start: build a GPT, save it as a Hugging Face checkpoint, load it back and stream a generation.

The model here is freshly initialised (random weights), so its text is noise: the point is the round trip
every later step uses. Train one with `sparkgpt train` or load a real checkpoint to get real text.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

import sparkgpt

RUN_DIR = Path("runs/quickstart")


def byte_tokenizer() -> sparkgpt.Tokenizer:
    """A byte-level tokenizer with no merges: 256 tokens, one per byte, so any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = BackendTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return sparkgpt.Tokenizer(backend)


def main() -> None:
    config = sparkgpt.preset("tiny-llama", vocab_size=256)
    print(f"A Llama-style GPT: {config.n_layers} layers, {config.n_heads} heads ({config.n_kv_heads} key/value), "
          f"{config.num_parameters():,} parameters")
    lm = sparkgpt.LM(sparkgpt.GPT(config).eval(), byte_tokenizer())
    lm.save(RUN_DIR)
    print(f"saved an HF-compatible checkpoint to {RUN_DIR}: {', '.join(sorted(p.name for p in RUN_DIR.iterdir()))}")
    print("\n$ sparkgpt generate runs/quickstart --prompt 'Hello' --max-new-tokens 24 --seed 0 --stream")
    subprocess.run([sys.executable, "-m", "sparkgpt", "generate", str(RUN_DIR), "--prompt", "Hello",
                    "--max-new-tokens", "24", "--seed", "0", "--stream"], check=True)
    print("\n(random weights, so random bytes; see README for training and real models)")


if __name__ == "__main__":
    main()
