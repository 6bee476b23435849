"""Generation: sampling, the KV-cached decode loop over a ragged batch, stop conditions and streaming text."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from sparkgpt.errors import SparkGPTError
from sparkgpt.model import GPT, EncoderDecoder, KVCache
from sparkgpt.model.decode import decode_step
from sparkgpt.tokenizer import Tokenizer


class SamplingParamError(SparkGPTError):
    """A sampling value of the wrong type or out of range; `field` names it (the HTTP API reports it as `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


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
    # Beam search (num_beams > 1): the most likely continuation under log p / length^length_penalty, deterministic.
    num_beams: int = 1
    length_penalty: float = 1.0

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
            ("num_beams", _is_int(self.num_beams) and self.num_beams >= 1, "an integer >= 1"),
            ("length_penalty", _is_number(self.length_penalty), "a finite number"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise SamplingParamError(name, f"sampling parameter {name!r} is {getattr(self, name)!r}; "
                                               f"expected {expected}")


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
        logits = nucleus(logits, params.top_p)
    return logits


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches top_p (always at least one); -inf the rest.

    The nucleus is usually a few dozen tokens, so it is looked for among the best 256 first (a partial sort, much
    cheaper than sorting a 50k vocabulary per row per step); only when some row's best 256 hold no more than top_p
    of its mass is the whole vocabulary sorted. Either way the kept set is the same."""
    candidates = min(256, logits.shape[-1])
    top_logits, order = logits.topk(candidates, dim=-1)
    probs = (top_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    if candidates < logits.shape[-1] and not bool((mass_before[:, -1] > top_p).all()):
        top_logits, order = logits.sort(dim=-1, descending=True)
        probs = top_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
    kept = top_logits.masked_fill(mass_before > top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, kept)


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
    row's positions count from its own first token, so every row computes what it would alone. The prompt goes
    through the model's forward; each new token through its lean decode step (`sparkgpt.model.decode`) when the
    model has one.
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
                   cache=cache, last_only=True)[:, -1]
    step_model = decode_step(model)
    visible = padding_mask.bool()[:, None, None, :]  # [B, 1, 1, capacity]: the decode steps' masks are its prefixes
    next_positions = positions[:, -1] + 1
    for step in range(params.max_new_tokens):
        tokens = sample_next(logits.float(), params, generator, seen)
        yield tokens
        if step + 1 == params.max_new_tokens:
            return
        if seen is not None:
            seen[torch.arange(batch), tokens] = True
        if step_model is not None:
            logits = step_model(tokens, next_positions, cache, visible[..., : cache.length + 1] if ragged else None)
        else:
            logits = model(tokens[:, None], positions=next_positions[:, None],
                           attention_mask=padding_mask[:, : cache.length + 1] if ragged else None,
                           cache=cache, last_only=True)[:, -1]
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
    if params.num_beams > 1:
        yield from beam_completions(model, tokenizer, prompts, params, stop_ids)
        return
    texts = [StreamText(tokenizer, params.stop) for _ in prompts]
    completions: list[Completion | None] = [None] * len(prompts)
    new_ids: list[list[int]] = [[] for _ in prompts]
    steps = seq2seq_steps(model, prompts, params) if isinstance(model, EncoderDecoder) else \
        token_steps(model, prompts, params)
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



# ---- encoder–decoder generation ------------------------------------------------------------------------------

def _start_token(model: EncoderDecoder) -> int:
    config = model.config
    start = config.bos_token_id if config.bos_token_id is not None else config.pad_token_id
    if start is None:
        raise SparkGPTError("this encoder–decoder model has no bos_token_id (or pad_token_id) to start decoding from")
    return start


def _encode_sources(model: EncoderDecoder, sources: Sequence[Sequence[int]]):
    """Right-padded source ids, their padding mask and the memory's keys/values of every decoder layer."""
    weight = model.embeddings.token_embedding.weight
    longest = max(len(s) for s in sources)
    pad = model.config.pad_token_id or 0
    source_ids = torch.full((len(sources), longest), pad, dtype=torch.long)
    source_mask = torch.zeros(len(sources), longest, dtype=torch.long)
    for row, source in enumerate(sources):
        source_ids[row, :len(source)] = torch.tensor(source, dtype=torch.long)
        source_mask[row, :len(source)] = 1
    source_ids, source_mask = source_ids.to(weight.device), source_mask.to(weight.device)
    return source_mask, model.memory_kv(model.encode(source_ids, source_mask))


@torch.inference_mode()
def seq2seq_steps(
    model: EncoderDecoder, sources: Sequence[Sequence[int]], params: SamplingParams
) -> Iterator[torch.Tensor]:
    """As `token_steps`, for an encoder–decoder: the sources are encoded once, then the target is decoded from the
    start token with the KV cache (cross-attention keys/values computed once per layer)."""
    config, weight = model.config, model.embeddings.token_embedding.weight
    if params.max_new_tokens + 1 > config.max_seq_len:
        raise SparkGPTError(f"max_new_tokens {params.max_new_tokens} exceeds the model's context of "
                            f"{config.max_seq_len} tokens")
    source_mask, memory_kv = _encode_sources(model, sources)
    batch = len(sources)
    generator = torch.Generator(device=weight.device).manual_seed(params.seed) if params.seed is not None else None
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, config.vocab_size, dtype=torch.bool, device=weight.device)
    cache = KVCache(config, batch, params.max_new_tokens + 1, weight.dtype, weight.device)
    tokens = torch.full((batch,), _start_token(model), dtype=torch.long, device=weight.device)
    for step in range(params.max_new_tokens):
        logits = model.decode(tokens[:, None], memory_kv, source_mask, cache)
        tokens = sample_next(logits[:, -1].float(), params, generator, seen)
        yield tokens
        if step + 1 == params.max_new_tokens:
            return
        if seen is not None:
            seen[torch.arange(batch), tokens] = True


# ---- beam search ---------------------------------------------------------------------------------------------

class _BeamModel:
    """The two calls beam search makes, for a decoder-only or an encoder–decoder model: the first next-token
    logits [1, vocab] of one prompt, then the logits [beams, vocab] after extending beam rows `parents` by `tokens`."""

    def __init__(self, model: GPT | EncoderDecoder, prompt: Sequence[int], beams: int, max_new_tokens: int) -> None:
        self.model, self.beams = model, beams
        config = model.config
        self.seq2seq = isinstance(model, EncoderDecoder)
        weight = model.embeddings.token_embedding.weight if self.seq2seq else model.token_embedding.weight
        capacity = max_new_tokens + 1 if self.seq2seq else len(prompt) + max_new_tokens
        if capacity > config.max_seq_len:
            raise SparkGPTError(f"prompt of {len(prompt)} tokens plus max_new_tokens {max_new_tokens} exceeds the "
                                f"model's context of {config.max_seq_len} tokens")
        self.cache = KVCache(config, 1, capacity, weight.dtype, weight.device)
        self.device = weight.device
        self.prompt = torch.tensor([list(prompt)], dtype=torch.long, device=weight.device)

    def first(self) -> torch.Tensor:
        if self.seq2seq:
            self.source_mask, memory_kv = _encode_sources(self.model, [self.prompt[0].tolist()])
            # Every beam reads the same memory: expanded views, no copies.
            self.memory_kv = [(k.expand(self.beams, -1, -1, -1), v.expand(self.beams, -1, -1, -1))
                              for k, v in memory_kv]
            self.source_mask = self.source_mask.expand(self.beams, -1)
            start = torch.full((1, 1), _start_token(self.model), dtype=torch.long, device=self.device)
            logits = self.model.decode(start, [(k[:1], v[:1]) for k, v in self.memory_kv], self.source_mask[:1],
                                       self.cache)
        else:
            logits = self.model(self.prompt, cache=self.cache, last_only=True)
        return logits[:, -1].float()

    def next(self, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.reorder(parents)
        n = len(parents)
        if self.seq2seq:
            kv = [(k[:n], v[:n]) for k, v in self.memory_kv]
            logits = self.model.decode(tokens[:, None], kv, self.source_mask[:n], self.cache)
        else:
            logits = self.model(tokens[:, None], cache=self.cache, last_only=True)
        return logits[:, -1].float()


@torch.inference_mode()
def beam_search(
    model: GPT | EncoderDecoder, prompt: Sequence[int], params: SamplingParams, stop_ids: set[int]
) -> tuple[list[int], bool]:
    """The best continuation of one prompt (decoder-only) or source (encoder–decoder) found with `num_beams`
    beams, and whether it ended with a stop token (left out of the ids).

    Each step extends every live beam by every token and keeps the `num_beams` best by summed log-probability;
    a candidate ending in a stop token among them is finished, scored Σ log p / length^length_penalty (length:
    new tokens including the stop token), and the search ends once `num_beams` hypotheses are finished (HF's
    early_stopping=True) or after max_new_tokens, when live beams are scored the same way. With one beam this is
    greedy decoding, token for token.
    """
    beams = params.num_beams
    runner = _BeamModel(model, prompt, beams, params.max_new_tokens)
    logprobs = torch.log_softmax(runner.first(), dim=-1)
    sums = torch.zeros(1, device=logprobs.device)
    alive: list[list[int]] = [[]]
    finished: list[tuple[float, list[int], bool]] = []
    vocab = logprobs.shape[-1]
    for step in range(params.max_new_tokens):
        scores = (sums[:, None] + logprobs).flatten()
        top_scores, top_index = scores.topk(min(2 * beams, scores.numel()))
        parents, tokens, next_sums, next_alive = [], [], [], []
        for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist(), strict=True)):
            parent, token = divmod(index, vocab)
            if token in stop_ids:
                if rank < beams:
                    finished.append((score / (step + 1) ** params.length_penalty, alive[parent], True))
                continue
            parents.append(parent)
            tokens.append(token)
            next_sums.append(score)
            next_alive.append([*alive[parent], token])
            if len(next_alive) == beams:
                break
        if len(finished) >= beams or step + 1 == params.max_new_tokens or not next_alive:
            if len(finished) < beams or not finished:
                finished += [(s / (step + 1) ** params.length_penalty, ids, False)
                             for s, ids in zip(next_sums, next_alive, strict=True)]
            break
        alive, sums = next_alive, torch.tensor(next_sums, device=logprobs.device)
        logprobs = torch.log_softmax(runner.next(torch.tensor(parents, device=runner.device),
                                                 torch.tensor(tokens, device=runner.device)), dim=-1)
    _, ids, stopped = max(finished, key=lambda hypothesis: hypothesis[0])
    return ids, stopped


def beam_completions(
    model: GPT | EncoderDecoder, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
    stop_ids: set[int],
) -> Iterator[tuple[int, str, Completion | None]]:
    """Beam search over each prompt in turn; each yields its whole text at once (beams cannot stream)."""
    for row, prompt in enumerate(prompts):
        ids, stopped = beam_search(model, prompt, params, stop_ids)
        text, cut = cut_at_stop(tokenizer.decode(ids), params.stop)
        reason = "stop" if stopped or cut else "length"
        yield row, text, Completion(text, ids, len(prompt), reason)
