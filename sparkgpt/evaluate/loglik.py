"""Log-likelihood scoring: how probable a model finds a continuation of a context, and of a whole text.

Scoring several continuations of one context (the choices of a multiple-choice item, the labels of a classifier)
runs the context through the model once; the continuations then run together as one batch on copies of its
KV cache. That is the shared-prefix reuse that makes an item with four choices cost little more than one; and
`score_batch` does it for many items at once, in two forward passes in all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparkgpt.data.batch import pad_rows
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import GPT, KVCache
from sparkgpt.tokenizer import Tokenizer


@dataclass(frozen=True)
class Score:
    """log p(continuation | context) summed over its tokens; whether greedy decoding would produce it."""

    logprob: float
    is_greedy: bool
    n_tokens: int


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split as lm-evaluation-harness splits them: trailing spaces
    of the context move to the continuation, and the continuation's ids are those of the whole text after the
    context's, so a word is tokenised as it would be in running text."""
    stripped = context.rstrip()
    continuation, context = context[len(stripped):] + continuation, stripped
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


def encode_reply(
    tokenizer: Tokenizer, request: str, reply: str, stop_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Token ids of a chat prompt (the user's `request`, ready for the assistant's turn) and of `reply` as the
    assistant's whole turn, both rendered by the model's own chat template. The turn is cut after its first
    stop token (the end-of-turn token that ends generation), so the score is that of the reply being exactly
    `reply`, not of a longer reply starting with it; a template without one keeps the whole turn."""
    messages = [{"role": "user", "content": request}]
    prompt = tokenizer.apply_chat_template(messages)
    whole = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}],
                                          add_generation_prompt=False)
    if not whole.startswith(prompt):
        raise SparkGPTError("this chat template does not write the assistant's reply after its generation prompt: "
                            "score with plain prompts instead (chat=False, --chat-template off)")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    whole_ids = tokenizer.encode(whole, add_special_tokens=False)
    # The generation prompt usually ends in a special token or a newline, which never merges with the reply.
    turn = (whole_ids[len(prompt_ids):] if whole_ids[:len(prompt_ids)] == prompt_ids
            else tokenizer.encode(whole[len(prompt):], add_special_tokens=False))
    end = next((i + 1 for i, token in enumerate(turn) if token in stop_ids), len(turn))
    return prompt_ids, turn[:end]


def prefix_token(tokenizer: Tokenizer) -> int:
    """What an empty context starts from: the beginning-of-text token, else the end-of-text one."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("scoring from an empty context needs a bos or eos token")
    return token


def score_continuations(
    model: GPT, context: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[Score]:
    """Score every continuation of one context; the context is computed once and its cache shared."""
    return score_batch(model, [(context, continuations)])[0]


@torch.inference_mode()
def score_batch(
    model: GPT, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
) -> list[list[Score]]:
    """Score several (context, continuations) requests in two forward passes in all.

    On a CPU a small batch costs about what one sequence costs (each pass reads every weight once), so items are
    scored together: pass 1 runs every context but its last token (left-padded into one batch) into a KV cache;
    pass 2 runs every continuation, each row on its own context's cached keys, behind that context's last token.
    Right-padding inside pass 2 is harmless: causal attention never lets a real token see the padding after it.
    """
    if any(not context for context, _ in requests):
        raise ValueError("every context must hold at least one token")
    device, dtype = model.token_embedding.weight.device, model.token_embedding.weight.dtype
    prefixes = [list(context[:-1]) for context, _ in requests]
    rows = [(item, list(c)) for item, (_, continuations) in enumerate(requests) for c in continuations]
    width, longest = max(len(p) for p in prefixes), max(len(c) for _, c in rows)

    cache = KVCache(model.config, len(requests), width + 1 + longest, dtype, device)
    prefix_ids, padding = (t.to(device) for t in pad_rows(prefixes, left=True))
    if width:
        positions = (padding.cumsum(1) - 1).clamp(min=0)
        model(prefix_ids, positions=positions, attention_mask=padding, cache=cache, last_only=True)

    items = torch.tensor([item for item, _ in rows], device=device)
    cache.reorder(items)  # one row per continuation; also the sliding-window ring and key positions of local layers
    # Right-padded: causal attention never lets a real token see the padding after it.
    batch = pad_rows([[requests[item][0][-1], *continuation] for item, continuation in rows],
                     width=1 + longest)[0].to(device)
    starts = torch.tensor([len(prefixes[item]) for item, _ in rows], device=device)
    positions = starts[:, None] + torch.arange(1 + longest, device=device)
    mask = torch.cat([padding[items], torch.ones(len(rows), 1 + longest, dtype=torch.long, device=device)], dim=1)
    logprobs = torch.log_softmax(model(batch, positions=positions, attention_mask=mask, cache=cache)[:, :-1].float(),
                                 dim=-1)

    scores: list[list[Score]] = [[] for _ in requests]
    for row, (item, continuation) in enumerate(rows):
        targets = batch[row, 1:1 + len(continuation)]
        row_logprobs = logprobs[row, : len(continuation)]
        picked = row_logprobs.gather(-1, targets[:, None]).squeeze(-1)
        greedy = bool((row_logprobs.argmax(-1) == targets).all())
        scores[item].append(Score(float(picked.sum()), greedy, len(continuation)))
    return scores


@torch.inference_mode()
def score_text(model: GPT, token_ids: Sequence[int], start_token: int, window: int | None = None) -> float:
    """log p(text) summed over every token, the first predicted from `start_token`; a text longer than the
    model's context is cut into disjoint windows (lm-evaluation-harness's rolling log-likelihood)."""
    window = min(window or model.config.max_seq_len, model.config.max_seq_len)
    device = model.token_embedding.weight.device
    ids = [start_token, *token_ids]
    total = 0.0
    for start in range(0, len(token_ids), window):
        inputs = torch.tensor([ids[start:start + window]], device=device)
        targets = torch.tensor(ids[start + 1:start + 1 + window], device=device)
        logprobs = torch.log_softmax(model(inputs)[0, : len(targets)].float(), dim=-1)
        total += float(logprobs.gather(-1, targets[:, None]).sum())
    return total


def perplexity(total_logprob: float, n_tokens: int) -> float:
    return math.exp(-total_logprob / n_tokens)


def bits_per_byte(total_logprob: float, n_bytes: int) -> float:
    """Tokenizer-independent: nats over the whole text turned into bits, per UTF-8 byte of the text."""
    return -total_logprob / (math.log(2) * n_bytes)
