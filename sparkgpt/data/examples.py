"""Fine-tuning data from JSONL: chat conversations, prompt/completion pairs, plain texts, or labeled texts.

Each line is one record, in any of these shapes (they may be mixed):
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
        rendered with the model's chat template; only the assistant turns (with their end-of-turn token) carry loss
    {"prompt": ..., "completion": ...}   the completion (and an end-of-text token) carries loss, the prompt none
    {"text": ...}                        every token carries loss, then an end-of-text token
For a classification head (`task: classify`) each record is {"text": ..., "label": ...}.

Every example is tokenised once. One longer than block_size is truncated (its first tokens kept) and counted;
one left with no token that carries loss is skipped and counted; both counts are reported, never silent.
Batches are whole examples right-padded to the longest of the micro-batch (under causal attention padding at the
end changes nothing before it; padded targets are -100, ignored by the loss). The examples of optimizer step s are
a pure function of (seed, s): an epoch-wise shuffle, so every example is seen once per epoch and a resumed run
reads exactly what an uninterrupted one would; within a step they are sorted by length, so micro-batches pad little.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkgpt.data.batch import pad_rows
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_jsonl
from sparkgpt.tokenizer import Tokenizer

IGNORE = -100  # F.cross_entropy's default ignore_index
_EVAL_STREAM = 0x5EED_E7A1
_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ClassifyBatch:
    """Model inputs of a classification batch: right-padded ids [B, T] and each row's real length [B]."""

    input_ids: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def of(cls, sequences: list[list[int]], pad: int) -> ClassifyBatch:
        return cls(pad_rows(sequences, pad)[0], torch.tensor([len(s) for s in sequences], dtype=torch.long))

    def to(self, device: torch.device, non_blocking: bool = False) -> ClassifyBatch:
        return ClassifyBatch(self.input_ids.to(device, non_blocking=non_blocking),
                             self.lengths.to(device, non_blocking=non_blocking))

    def model_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positional arguments of SequenceClassifier.forward(input_ids, lengths)."""
        return self.input_ids, self.lengths


@dataclass
class Example:
    ids: list[int]
    target: list[int] | int  # per-token labels (-100 where no loss), or a class index


@dataclass
class DataReport:
    """What tokenising a file did: examples kept, truncated to block_size, and skipped for having no loss."""

    path: str
    examples: int = 0
    truncated: int = 0
    skipped: list[int] = field(default_factory=list)  # line numbers

    def summary(self) -> str:
        text = f"{self.path}: {self.examples} examples"
        if self.truncated:
            text += f", {self.truncated} truncated to block_size"
        if self.skipped:
            lines = ", ".join(map(str, self.skipped[:10])) + (" ..." if len(self.skipped) > 10 else "")
            text += f", {len(self.skipped)} skipped (no trained token within block_size: line {lines})"
        return text


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise SparkGPTError(f"{where}: 'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise SparkGPTError(f"{where}: messages[{index}] must be an object with a string 'content'")
        if message.get("role") not in _ROLES:
            raise SparkGPTError(f"{where}: messages[{index}].role is {message.get('role')!r}; "
                                f"expected one of {', '.join(_ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise SparkGPTError(f"{where}: no assistant message (nothing to learn from)")
    return messages


def _render_start(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    """The rendering up to the generation prompt after `messages`: what comes before the next assistant turn. With
    no messages yet, what the template writes on its own (a default system prompt, as SmolLM2's), when it can."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except SparkGPTError:
        if messages:
            raise
        return ""  # a template that cannot render an empty conversation writes nothing before the first turn


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn.

    Each assistant turn's text is what rendering the conversation up to and including it adds to the rendering up
    to its generation prompt: the reply and its end-of-turn marker. The whole conversation is tokenised once and
    each token is assigned by its character offsets, so the ids are exactly those of the rendered text."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_start(tokenizer, messages[:index])
        through = tokenizer.apply_chat_template(messages[:index + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise SparkGPTError(f"{where}: the chat template does not render this conversation turn by turn "
                                "(an earlier turn changes when a later one is added); use prompt/completion records")
        spans.append((len(before), len(through)))
    ids, offsets = tokenizer.encode_with_offsets(text)
    trained = [any(start <= begin < end for start, end in spans) for begin, _ in offsets]
    return ids, trained


def encode_lm_record(tokenizer: Tokenizer, record: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
    """(ids, per-token "carries loss") for a chat, prompt/completion or text record."""
    eos = tokenizer.eos_token_id
    end = [eos] if eos is not None else []
    if "messages" in record:
        return encode_chat(tokenizer, _check_messages(record["messages"], where), where)
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise SparkGPTError(f"{where}: 'prompt' and 'completion' must both be strings")
        prompt_ids = tokenizer.encode(prompt)
        completion_ids = tokenizer.encode(completion, add_special_tokens=False) + end
        return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise SparkGPTError(f"{where}: 'text' must be a string")
        ids = tokenizer.encode(record["text"]) + end
        return ids, [True] * len(ids)
    raise SparkGPTError(f"{where}: expected 'messages', 'prompt' and 'completion', or 'text' "
                        f"(found keys: {', '.join(sorted(record)) or 'none'})")


def lm_example(ids: list[int], trained: list[bool], block_size: int) -> tuple[Example | None, bool]:
    """(the example with next-token labels, whether it was truncated); None when no label is left.
    Position t predicts token t+1, so a token carries loss at the position before it."""
    truncated = len(ids) > block_size + 1
    ids, trained = ids[:block_size + 1], trained[:block_size + 1]
    labels = [token if keep else IGNORE for token, keep in zip(ids[1:], trained[1:], strict=True)]
    if all(label == IGNORE for label in labels):
        return None, truncated
    return Example(ids[:-1], labels), truncated


def labeled(record: dict[str, Any], where: str) -> tuple[str, str]:
    """(text, label name) of a labeled record."""
    text, label = record.get("text"), record.get("label")
    if not isinstance(text, str) or not isinstance(label, (str, int)) or isinstance(label, bool):
        raise SparkGPTError(f"{where}: expected {{\"text\": string, \"label\": string or integer}}")
    return text, str(label)


def label_names(records: list[tuple[int, dict[str, Any]]], path: Path) -> list[str]:
    """The sorted label names a labeled training file uses."""
    labels = sorted({labeled(record, f"{path}:{number}")[1] for number, record in records})
    if len(labels) < 2:
        raise SparkGPTError(f"{path}: found {len(labels)} distinct label(s); classification needs at least 2")
    return labels


def held_out_split(records: list[tuple[int, dict[str, Any]]], task: str, path: Path, seed: int
                   ) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, dict[str, Any]]]]:
    """(train, validation): a seeded random 10% of the records (at least one) held out; for classification 10% of
    each label's records (at least one of every label that has two), so a file sorted by label still splits well."""
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    if task == "classify":
        groups: dict[str, list[int]] = {}
        for index, (number, record) in enumerate(records):
            groups.setdefault(labeled(record, f"{path}:{number}")[1], []).append(index)
    else:
        groups = {"": list(range(len(records)))}
    held = set()
    for indices in groups.values():
        if len(indices) >= 2:
            held.update(rng.permutation(indices)[:max(1, len(indices) // 10)].tolist())
    if not held:
        raise SparkGPTError(f"{path}: too few records to hold some out for validation; pass a validation file")
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def epoch_rows(n: int, seed: int, step: int, count: int) -> np.ndarray:
    """The `count` example indices of step `step`: sample i = step·count + j is position i mod n of the shuffle
    of epoch i // n, so each epoch visits every example once."""
    shuffles: dict[int, np.ndarray] = {}
    rows = []
    for index in range(step * count, (step + 1) * count):
        epoch, position = divmod(index, n)
        if epoch not in shuffles:
            shuffles[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        rows.append(shuffles[epoch][position])
    return np.asarray(rows)


def micro_batch_rows(step_rows: np.ndarray, rank: int, world_size: int, micro: int, batch_size: int) -> np.ndarray:
    """Micro-batch `micro` of rank `rank` from a step's rows (longest first, `FinetuneData.step_rows`): consecutive
    micro-batches are dealt to the ranks in turn (the (micro·W + rank)-th), so each pads little and every rank
    gets a like share of the long examples (taking them in rank order would give rank 0 all the longest)."""
    start = (micro * world_size + rank) * batch_size
    return step_rows[start:start + batch_size]


class FinetuneData:
    """Tokenised fine-tuning examples, train and val, with the trainer's data interface."""

    def __init__(self, train_path: str | Path, val_path: str | Path | None, tokenizer: Tokenizer, block_size: int,
                 task: str = "lm", labels: list[str] | None = None, seed: int = 0) -> None:
        self.tokenizer, self.block_size, self.task = tokenizer, block_size, task
        self.directory = Path(train_path).parent
        self.vocab_size = tokenizer.vocab_size
        pad = tokenizer.token_to_id("<pad>")
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        train_path = Path(train_path)
        train_records = read_jsonl(train_path)
        if val_path:
            val_path = Path(val_path)
            val_records, val_name = read_jsonl(val_path), str(val_path)
        else:
            if len(train_records) < 2:
                raise SparkGPTError(f"{train_path}: needs at least 2 records, or a separate validation file")
            train_records, val_records = held_out_split(train_records, task, train_path, seed)
            val_path, val_name = train_path, f"{train_path} ({len(val_records)} records held out)"
        if task == "classify":
            self.labels = labels or label_names(train_records, train_path)
        self.reports: list[DataReport] = []
        self.train = self._encode(train_records, train_path, str(train_path))
        self.val = self._encode(val_records, val_path, val_name)
        self._lengths = np.asarray([len(example.ids) for example in self.train])

    def _encode(self, records: list[tuple[int, dict[str, Any]]], path: Path, name: str) -> list[Example]:
        report = DataReport(name)
        examples = []
        for number, record in records:
            where = f"{path}:{number}"
            if self.task == "classify":
                text, label = labeled(record, where)
                if label not in self.labels:
                    raise SparkGPTError(f"{where}: label {label!r} is not among the training labels "
                                        f"({', '.join(self.labels)})")
                ids = self.tokenizer.encode(text) or [self.pad_id]
                report.truncated += len(ids) > self.block_size
                examples.append(Example(ids[:self.block_size], self.labels.index(label)))
                continue
            ids, trained = encode_lm_record(self.tokenizer, record, where)
            example, truncated = lm_example(ids, trained, self.block_size)
            report.truncated += truncated
            if example is None:
                report.skipped.append(number)
            else:
                examples.append(example)
        report.examples = len(examples)
        self.reports.append(report)
        if not examples:
            raise SparkGPTError(f"{name}: no usable examples ({report.summary()})")
        return examples

    def summary(self) -> str:
        return "; ".join(report.summary() for report in self.reports)

    @property
    def dropped_any(self) -> bool:
        """Whether any example was truncated or skipped (always worth telling)."""
        return any(report.truncated or report.skipped for report in self.reports)

    def check_block_size(self, block_size: int) -> None:
        """Examples were truncated to block_size when read: any block size fits."""

    @property
    def train_tokens(self) -> int:
        return int(self._lengths.sum())

    def step_rows(self, seed: int, step: int, count: int) -> np.ndarray:
        """The training examples of optimizer step `step`, longest first (each micro-batch pads little)."""
        rows = epoch_rows(len(self.train), seed, step, count)
        return rows[np.argsort(-self._lengths[rows], kind="stable")]

    def eval_rows(self, seed: int, count: int) -> np.ndarray:
        """The validation examples every evaluation scores: each once, the first `count` of them at most."""
        return np.arange(min(count, len(self.val)))

    def batch(self, examples: list[Example], rows: np.ndarray) -> tuple[torch.Tensor | ClassifyBatch, torch.Tensor]:
        """(inputs, targets) for examples[rows], right-padded to the longest."""
        chosen = [examples[int(row)] for row in rows]
        if self.task == "classify":
            return ClassifyBatch.of([example.ids for example in chosen], self.pad_id), \
                torch.tensor([example.target for example in chosen], dtype=torch.long)
        return pad_rows([example.ids for example in chosen], self.pad_id)[0], \
            pad_rows([example.target for example in chosen], IGNORE)[0]
