"""Token data on disk, read by memmap: shards of uint16 or uint32 ids described by meta.json.

A prepared folder holds `train-00000.bin`, `train-00001.bin`, ... and `val-00000.bin`, ..., each at most
`shard_tokens` long, listed in order in meta.json (version 2); the trainer sees one array per split, whatever the
number of shards. Version 1 folders (one `train.bin` and one `val.bin`) are still read.

Batches are drawn by position, not by iteration: the sequences of optimizer step `s` are a pure function of
(seed, s), so a resumed run reads exactly what an uninterrupted one would, and a data-parallel run splits the same
global batch across ranks (rank r takes its own slice) whatever the number of processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object

META_FILE = "meta.json"
TRAIN_FILE = "train.bin"  # version 1
VAL_FILE = "val.bin"
SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard: small enough to copy or upload one at a time
_COPY_TOKENS = 1 << 22  # tokens per read while splitting off validation: memory stays flat
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
        self.train = self._split("train", TRAIN_FILE)
        self.val = self._split("val", VAL_FILE)

    def _split(self, split: str, version_1_file: str) -> np.ndarray | ShardedTokens:
        listed = self.meta.get(f"{split}_shards")
        if listed is None:
            return self._open(version_1_file, self.meta.get(f"{split}_tokens"))
        if not isinstance(listed, list) or not all(
                isinstance(entry, dict) and isinstance(entry.get("file"), str) and "/" not in entry["file"]
                and entry["file"] not in ("", ".", "..") and isinstance(entry.get("tokens"), int) for entry in listed):
            raise SparkGPTError(f"{self.directory / META_FILE}: '{split}_shards' must be a list of "
                                "{\"file\": name, \"tokens\": count} objects")
        shards = [self._open(entry["file"], entry["tokens"]) for entry in listed]
        return shards[0] if len(shards) == 1 else ShardedTokens(shards, self.dtype)

    def _open(self, name: str, expected: object) -> np.ndarray:
        path = self.directory / name
        if not path.is_file():
            raise SparkGPTError(f"{path}: missing from the prepared data folder")
        item = np.dtype(self.dtype).itemsize
        size = path.stat().st_size
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


class ShardedTokens:
    """Several token files read as one array: `len()` and slices (`tokens[a:b]`, across shard ends too)."""

    def __init__(self, shards: list[np.ndarray], dtype: str) -> None:
        self.shards = shards
        self.dtype = np.dtype(dtype)
        self.ends = np.cumsum([len(shard) for shard in shards])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        pieces = []
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            shard_start = int(self.ends[shard - 1]) if shard else 0
            end = min(stop, int(self.ends[shard]))
            pieces.append(self.shards[shard][start - shard_start:end - shard_start])
            start, shard = end, shard + 1
        if len(pieces) == 1:
            return np.asarray(pieces[0])
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0:len(self)]
        return whole if dtype is None else whole.astype(dtype)

    def tolist(self) -> list[int]:
        return self[0:len(self)].tolist()


class ShardWriter:
    """Appends token arrays to `{prefix}-00000.bin`, `{prefix}-00001.bin`, ... of at most `shard_tokens` each."""

    def __init__(self, directory: Path, prefix: str, dtype: str, shard_tokens: int = SHARD_TOKENS) -> None:
        if shard_tokens < 1:
            raise SparkGPTError(f"shard_tokens is {shard_tokens}; expected a positive number of tokens")
        self.directory, self.prefix, self.dtype, self.shard_tokens = directory, prefix, dtype, shard_tokens
        self.shards: list[dict[str, int | str]] = []
        self._file = None
        self._room = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        while len(ids):
            if self._room == 0:
                self._next_shard()
            taken = ids[:self._room]
            taken.tofile(self._file)
            self.shards[-1]["tokens"] += len(taken)
            self._room -= len(taken)
            ids = ids[len(taken):]

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 (closed by close() or the next shard)
        self.shards.append({"file": name, "tokens": 0})
        self._room = self.shard_tokens

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(int(shard["tokens"]) for shard in self.shards)


def split_tail(directory: Path, shards: list[dict], dtype: str, tail_tokens: int, prefix: str,
               shard_tokens: int = SHARD_TOKENS) -> tuple[list[dict], list[dict]]:
    """Move the last `tail_tokens` tokens of `shards` into new `{prefix}-*.bin` shards; returns (head, tail) lists.

    The tail is copied in bounded pieces; the shard the cut falls in is truncated in place, later ones deleted."""
    item = np.dtype(dtype).itemsize
    head = [dict(shard) for shard in shards]
    pieces: list[tuple[Path, int, int]] = []  # (file, first token, tokens) in corpus order, collected backwards
    remaining = tail_tokens
    while remaining > 0 and head:
        taken = min(remaining, int(head[-1]["tokens"]))
        pieces.insert(0, (directory / str(head[-1]["file"]), int(head[-1]["tokens"]) - taken, taken))
        remaining -= taken
        head[-1]["tokens"] -= taken
        if head[-1]["tokens"] == 0:
            head.pop()
    writer = ShardWriter(directory, prefix, dtype, shard_tokens)
    for path, first, count in pieces:
        for start in range(first, first + count, _COPY_TOKENS):
            writer.write(np.fromfile(path, dtype=dtype, offset=start * item,
                                     count=min(_COPY_TOKENS, first + count - start)))
    writer.close()
    for path, first, _ in pieces:
        if first == 0:
            path.unlink()
        else:
            os.truncate(path, first * item)
    return head, writer.shards


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
