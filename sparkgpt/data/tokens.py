"""Token data on disk, read by memmap: train.bin / val.bin (uint16 or uint32 ids) described by meta.json.

Batches are drawn by position, not by iteration: the sequences of optimizer step `s` are a pure function of
(seed, s), so a resumed run reads exactly what an uninterrupted one would, and a data-parallel run splits the same
global batch across ranks (rank r takes its own slice) whatever the number of processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object

META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
_EVAL_STREAM = 0x5EED_E7A1  # a fixed second key: evaluation draws its own fixed sequences, independent of steps


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned type that holds every id: uint16 up to 65,536 tokens, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenData:
    """A prepared data folder: memmapped train and val token arrays plus what meta.json says about them."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise SparkGPTError(f"{self.directory}: no such data folder (create one with `sparkgpt prepare`)")
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise SparkGPTError(f"{meta_path}: missing; {self.directory} is not a prepared data folder "
                                "(create one with `sparkgpt prepare`)")
        self.meta = read_json_object(meta_path)
        vocab_size, dtype = self.meta.get("vocab_size"), self.meta.get("dtype")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise SparkGPTError(f"{meta_path}: 'vocab_size' is {vocab_size!r}; expected a positive integer")
        if dtype not in ("uint16", "uint32"):
            raise SparkGPTError(f"{meta_path}: 'dtype' is {dtype!r}; expected 'uint16' or 'uint32'")
        self.vocab_size: int = vocab_size
        self.dtype: str = dtype
        self.train = self._open(TRAIN_FILE, "train_tokens")
        self.val = self._open(VAL_FILE, "val_tokens")

    def _open(self, name: str, count_key: str) -> np.ndarray:
        path = self.directory / name
        if not path.is_file():
            raise SparkGPTError(f"{path}: missing from the prepared data folder")
        item = np.dtype(self.dtype).itemsize
        size = path.stat().st_size
        expected = self.meta.get(count_key)
        if size % item or (isinstance(expected, int) and size != expected * item):
            raise SparkGPTError(f"{path}: {size} bytes, but meta.json says {expected} {self.dtype} tokens; "
                                "the folder is damaged: prepare it again")
        if size == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def check_block_size(self, block_size: int) -> None:
        for split, tokens in (("train", self.train), ("val", self.val)):
            if len(tokens) < block_size + 1:
                raise SparkGPTError(f"{self.directory}: the {split} split has {len(tokens)} tokens; block_size "
                                    f"{block_size} needs at least {block_size + 1}")


def step_offsets(n_tokens: int, block_size: int, seed: int, step: int, count: int) -> np.ndarray:
    """Start positions of the `count` sequences of optimizer step `step`: random, and a function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - block_size, size=count)


def eval_offsets(n_tokens: int, block_size: int, seed: int, count: int) -> np.ndarray:
    """The fixed validation sequences every evaluation scores (the same each time, so evaluations compare)."""
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    return rng.integers(0, n_tokens - block_size, size=count)


def gather(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, T] and next-token targets [B, T] (int64) for sequences starting at `offsets`."""
    rows = np.stack([np.asarray(tokens[start:start + block_size + 1], dtype=np.int64) for start in offsets])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]
