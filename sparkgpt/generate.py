"""Generation: sampling, the KV-cached decode loop over a ragged batch, stop conditions and streaming text."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from sparkgpt.errors import SparkGPTError
from sparkgpt.model import GPT, KVCache
from sparkgpt.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop. temperature 0 is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            ("top_k", self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "an integer >= 1"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
             "a finite number > 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "token ids >= 0"),
            ("seed", self.seed is None or _is_int(self.seed), "an integer"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise SparkGPTError(f"sampling parameter {name!r} is {getattr(self, name)!r}; expected {expected}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Completion:
    """One finished sequence: its text, its new token ids, and why it ended ("stop" or "length")."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "length"


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, vocab] reshaped for sampling: repetition penalty, temperature, then top-k and top-p filters."""
    if seen is not None:
        # CTRL's penalty as transformers applies it: make every token already in the text less likely.
        penalised = torch.where(logits < 0, logits * params.repetition_penalty, logits / params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth_best = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if params.top_p < 1.0:
        # Nucleus: keep the most likely tokens until their probability reaches top_p (always at least one).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]: the most likely at temperature 0, else a draw."""
    logits = process_logits(logits, params, seen)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def token_steps(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[torch.Tensor]:
    """Yield the next token [B] of every prompt, step by step, up to max_new_tokens; stop iterating to stop.

    Prompts of different lengths are left-padded into one batch: padding is masked out of attention and each
    row's positions count from its own first token, so every row computes what it would alone.
    """
    config = model.config
    weight = model.token_embedding.weight
    batch, longest = len(prompts), max(len(p) for p in prompts)
    capacity = longest + params.max_new_tokens
    if capacity > config.max_seq_len:
        raise SparkGPTError(
            f"prompt of {longest} tokens plus max_new_tokens {params.max_new_tokens} exceeds the model's "
            f"context of {config.max_seq_len} tokens"
        )
    input_ids = torch.zeros(batch, longest, dtype=torch.long)
    padding_mask = torch.ones(batch, capacity, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        padding_mask[row, : longest - len(prompt)] = 0
    input_ids, padding_mask = input_ids.to(weight.device), padding_mask.to(weight.device)
    ragged = any(len(p) != longest for p in prompts)
    positions = (padding_mask[:, :longest].cumsum(dim=1) - 1).clamp(min=0)

    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=weight.device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, config.vocab_size, dtype=torch.bool, device=weight.device)
        seen.scatter_(1, input_ids, padding_mask[:, :longest].bool())

    cache = KVCache(config, batch, capacity, weight.dtype, weight.device)
    logits = model(input_ids, positions=positions, attention_mask=padding_mask[:, :longest] if ragged else None,
                   cache=cache, last_only=True)
    next_positions = positions[:, -1:] + 1
    for step in range(params.max_new_tokens):
        tokens = sample_next(logits[:, -1].float(), params, generator, seen)
        yield tokens
        if step + 1 == params.max_new_tokens:
            return
        if seen is not None:
            seen[torch.arange(batch), tokens] = True
        logits = model(tokens[:, None], positions=next_positions,
                       attention_mask=padding_mask[:, : cache.length + 1] if ragged else None,
                       cache=cache, last_only=True)
        next_positions = next_positions + 1


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StreamText:
    """One sequence's text as its tokens arrive, released only once no stop string can still begin in it."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.decoder = tokenizer.incremental_decoder()
        self.stop = stop
        self.text = ""
        self.released = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """The text this token lets us release, and whether a stop string has now appeared."""
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        text, stopped = cut_at_stop(self.text, self.stop)
        end = len(text)
        if not stopped and not final:
            end -= max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        delta, self.released = text[self.released:end], max(self.released, end)
        return delta, stopped


def stream_completions(
    model: GPT, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
    stop_token_ids: Sequence[int] = (),
) -> Iterator[tuple[int, str, Completion | None]]:
    """Yield (row, text delta, Completion once that row is done) as generation proceeds over a batch."""
    stop_ids = set(params.stop_token_ids) | set(stop_token_ids)
    texts = [StreamText(tokenizer, params.stop) for _ in prompts]
    completions: list[Completion | None] = [None] * len(prompts)
    new_ids: list[list[int]] = [[] for _ in prompts]
    steps = token_steps(model, prompts, params)
    for step, tokens in enumerate(steps):
        for row, token in enumerate(tokens.tolist()):
            if completions[row] is not None:
                continue
            reason, delta = None, ""
            if token in stop_ids:
                reason = "stop"
            else:
                new_ids[row].append(token)
                delta, stopped = texts[row].push(token)
                if stopped:
                    reason = "stop"
                elif step + 1 == params.max_new_tokens:
                    reason = "length"
            if reason is not None:
                delta += texts[row].finish()  # held-back text is final now (empty past a stop string)
                text, _ = cut_at_stop(tokenizer.decode(new_ids[row]), params.stop)
                completions[row] = Completion(text, new_ids[row], len(prompts[row]), reason)
            if delta or reason is not None:
                yield row, delta, completions[row]
        if all(c is not None for c in completions):
            steps.close()
            return

