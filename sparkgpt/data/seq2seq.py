"""Sequence-to-sequence data for training an encoder–decoder with the same trainer: JSONL pairs.

`--data` is a JSONL file of {"source": ..., "target": ...} records (its last 10%, at least one, is the validation
split) or a folder holding train.jsonl and val.jsonl. The tokenizer is the folder's tokenizer.json when there is
one, else a character-level one built from every source and target, with three special tokens: </s> (end of a
target), <s> (the decoder's start) and <pad>.

A batch is whole examples, not token windows: sources right-padded with a mask, decoder inputs <s> + target, and
labels target + </s> with -100 (ignored by the loss) where the batch pads. Examples are drawn as the token data
draws its windows: the rows of optimizer step s are a pure function of (seed, s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkgpt.config import PRESETS
from sparkgpt.data.batch import pad_rows
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_jsonl
from sparkgpt.tokenizer import TOKENIZER_FILE, Tokenizer

EOS, BOS, PAD = "</s>", "<s>", "<pad>"
IGNORE = -100  # F.cross_entropy's default ignore_index
_EVAL_STREAM = 0x5EED_E7A1


@dataclass
class Seq2SeqBatch:
    """Model inputs of one batch: source ids and mask [B, S], decoder input ids [B, T]."""

    source_ids: torch.Tensor
    source_mask: torch.Tensor
    target_ids: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> Seq2SeqBatch:
        return Seq2SeqBatch(*(t.to(device, non_blocking=non_blocking) for t in
                              (self.source_ids, self.source_mask, self.target_ids)))

    def model_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positional arguments of EncoderDecoder.forward(source_ids, target_ids, source_mask)."""
        return self.source_ids, self.target_ids, self.source_mask


def read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, record in read_jsonl(path):
        if not isinstance(record.get("source"), str) or not isinstance(record.get("target"), str):
            raise SparkGPTError(f"{path}:{number}: expected an object with string fields 'source' and 'target'")
        pairs.append((record["source"], record["target"]))
    return pairs


class Seq2SeqData:
    """Tokenised source/target pairs, split into train and val, with the tokenizer that made them."""

    def __init__(self, path: str | Path) -> None:
        self.directory = Path(path)
        if self.directory.is_dir():
            train_path, val_path = self.directory / "train.jsonl", self.directory / "val.jsonl"
            for required in (train_path, val_path):
                if not required.is_file():
                    raise SparkGPTError(f"{required}: missing (a seq2seq data folder holds train.jsonl and val.jsonl)")
            train, val = read_pairs(train_path), read_pairs(val_path)
        elif self.directory.is_file():
            pairs = read_pairs(self.directory)
            n_val = max(1, len(pairs) // 10)
            if len(pairs) < 2:
                raise SparkGPTError(f"{self.directory}: needs at least 2 records (train and validation)")
            train, val = pairs[:-n_val], pairs[-n_val:]
            self.directory = self.directory.parent
        else:
            raise SparkGPTError(f"{path}: no such JSONL file or folder of sequence-to-sequence pairs")
        if (self.directory / TOKENIZER_FILE).is_file() and Path(path).is_dir():
            self.tokenizer = Tokenizer.from_dir(self.directory)
        else:
            texts = [text for pair in train + val for text in pair]
            self.tokenizer = Tokenizer.char_level(texts, special_tokens=[EOS, BOS, PAD])
            self.tokenizer.bos_token = BOS
        ids = {name: self.tokenizer.token_to_id(token) for name, token in
               (("eos", self.tokenizer.eos_token), ("bos", self.tokenizer.bos_token), ("pad", PAD))}
        if ids["eos"] is None or ids["bos"] is None:
            raise SparkGPTError(f"{self.directory / TOKENIZER_FILE}: needs bos and eos tokens for seq2seq training")
        self.eos_id, self.bos_id = ids["eos"], ids["bos"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        self.vocab_size = self.tokenizer.vocab_size
        self.train = [self._encode(pair) for pair in train]
        self.val = [self._encode(pair) for pair in val]

    @property
    def model_fields(self) -> dict[str, Any]:
        """ModelConfig fields the data decides: its special token ids."""
        return {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id}

    def _encode(self, pair: tuple[str, str]) -> tuple[list[int], list[int]]:
        source, target = pair
        return self.tokenizer.encode(source, add_special_tokens=False), \
            self.tokenizer.encode(target, add_special_tokens=False)

    def check_block_size(self, block_size: int) -> None:
        """Every source, and every target plus its start or end token, must fit in block_size."""
        longest = max(max(len(s), len(t) + 1) for s, t in self.train + self.val)
        if longest > block_size:
            raise SparkGPTError(f"{self.directory}: an example needs {longest} tokens; raise block_size "
                                f"(now {block_size}) to at least that")

    def step_rows(self, seed: int, step: int, count: int) -> np.ndarray:
        """The training examples of optimizer step `step`: random, and a function of (seed, step)."""
        return np.random.default_rng([seed, step]).integers(0, len(self.train), size=count)

    def eval_rows(self, seed: int, count: int) -> np.ndarray:
        """The fixed validation examples every evaluation scores."""
        return np.random.default_rng([seed, _EVAL_STREAM]).integers(0, len(self.val), size=count)

    def batch(self, examples: list[tuple[list[int], list[int]]], rows: np.ndarray) -> tuple[Seq2SeqBatch, torch.Tensor]:
        """(model inputs, labels [B, T]) for examples[rows]: teacher forcing, <s> + target -> target + </s>."""
        chosen = [examples[int(row)] for row in rows]
        source, source_mask = pad_rows([s for s, _ in chosen], self.pad_id)
        decoder_in, _ = pad_rows([[self.bos_id, *t] for _, t in chosen], self.pad_id)
        labels, _ = pad_rows([[*t, self.eos_id] for _, t in chosen], IGNORE)
        return Seq2SeqBatch(source, source_mask, decoder_in), labels


def is_seq2seq(model_preset: str) -> bool:
    return PRESETS.get(model_preset, {}).get("architecture") == "encoder-decoder"
