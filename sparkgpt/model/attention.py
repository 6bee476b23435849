"""Attention: the math, its fast path, rotary positions, T5's relative position bias and the KV cache.

Attention(Q, K, V) = softmax(Q Kᵀ / √d_k + M) V, where the mask M is 0 where a query may look and -∞ where
it may not (the future, and padding). `eager_attention` is that formula line for line; `sdpa_attention` hands
the same computation to PyTorch's fused kernels. Both take queries [B, H, T, d_k] and keys/values
[B, H_kv, S, d_k] with H a multiple of H_kv (grouped-query attention: each key/value head serves H / H_kv
query heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import sparkgpt.model.native as native
from sparkgpt.config import ModelConfig
from sparkgpt.model.layers import RMSNorm, softcap
from sparkgpt.model.sparse import bf16_band_attention, pattern_mask, sparse_attention


def repeat_kv(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B, H_kv, S, d] -> [B, H_kv * group_size, S, d]: each key/value head repeated for its query heads."""
    return x if group_size == 1 else x.repeat_interleave(group_size, dim=1)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] booleans, True where query i (the last q_len of kv_len positions) may see key j."""
    offset = kv_len - q_len
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=offset)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    scale: float | None = None, cap: float | None = None,
) -> torch.Tensor:
    """The reference: softmax(Q Kᵀ / √d_k + M) V, written out (`scale` replaces 1/√d_k when given; with `cap` the
    scores are soft-capped, cap · tanh(scores / cap), before the mask: Gemma 2). A boolean mask says where a query
    may look; a float mask is M itself, added to the scores (T5's position bias, -inf where a query may not look)."""
    group_size = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, group_size), repeat_kv(v, group_size)
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if cap is not None:
        scores = softcap(scores, cap)
    if is_causal:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None and mask.is_floating_point():
        scores = scores + mask
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """The same computation through torch's scaled_dot_product_attention (flash / memory-efficient kernels)."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if q_len == 1 and n_heads != n_kv_heads:
        # One new token sees every cached key, so the query heads that share a key/value head can ride along
        # the query axis of that head: no copy of K and V per decode step.
        grouped = q.view(batch, n_kv_heads, n_heads // n_kv_heads, head_dim)
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale).view(
            batch, n_heads, 1, head_dim)
    cpu_bf16 = q.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or v.dtype == torch.bfloat16)
    if cpu_bf16 and is_causal and mask is None and q_len == k.shape[2] and (
            out := bf16_band_attention(q, k, v, q_len, scale)) is not None:
        # Our bf16 kernel (csrc/attention_bf16.cpp): over twice as fast as torch's flash kernels, fp32 or bf16,
        # for training-sized blocks (RESULTS.md, "Figures behind choices in the code").
        return out
    if cpu_bf16 and torch.is_grad_enabled():
        # Training on a CPU without that kernel: torch's bf16 flash kernel's backward runs slower than its fp32
        # one (several times for small heads; RESULTS.md, "Figures behind choices in the code"), so we upcast.
        if mask is not None and mask.is_floating_point():  # an additive mask (T5's bias) follows the queries' dtype
            mask = mask.float()
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal,
                enable_gqa=n_heads != n_kv_heads, scale=scale,
            ).to(v.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=n_heads != n_kv_heads, scale=scale
    )


ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"eager": eager_attention, "sdpa": sdpa_attention}


ROPE_SCALING = ("linear", "llama3", "yarn", "dynamic", "longrope")
# Kinds whose angles depend on how far the sequence reaches, not on the position alone.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_depends_on_length(scaling: dict[str, Any] | None) -> bool:
    return scaling is not None and scaling.get("rope_type") in LENGTH_DEPENDENT_ROPE


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles: the pair (x_i, x_{i+d/2}) of each head turns by p · θ^(-2i/d) at position p.

    Returns cos and sin [B, 1, T, d] for positions [B, T], to broadcast over heads. Computed per forward
    (a few tiny ops) rather than cached, so the model holds no buffers and can be built on the meta device.
    `scaling` stretches the frequencies for contexts longer than the model was trained on (`rope_frequencies`);
    dynamic and longrope take the length the sequence reaches from the furthest of `positions` (as transformers
    does each forward: keys already cached keep the angles they were turned by).
    """
    length = int(positions.max()) + 1 if rope_depends_on_length(scaling) and positions.numel() else None
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, length)
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rope_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                     length: int | None = None) -> tuple[torch.Tensor, float]:
    """θ^(-2i/d) for each pair i, and the factor cos and sin are multiplied by, under a context extension:

    - linear (Chen et al. 2023, position interpolation): every frequency / factor;
    - llama3: frequencies whose wavelength is longer than the original context / low_freq_factor are divided by
      the factor, those shorter than the context / high_freq_factor kept, the band between blended linearly;
    - yarn (Peng et al. 2023): pairs that turn fewer than beta_slow times over the original context are
      interpolated, more than beta_fast times kept, a linear ramp between; cos and sin scaled by
      attention_factor (default 0.1 · ln(factor) + 1);
    - dynamic (dynamic NTK): past the original context L, the base grows with the `length` the sequence reaches,
      θ' = θ · (factor · length / L - (factor - 1))^(d / (d - 2)); within it, plain rope;
    - longrope (Phi-3): each pair's wavelength stretched by its own short_factor within the original context and
      long_factor past it; cos and sin scaled by attention_factor (default √(1 + ln(factor) / ln L), 1 when
      factor ≤ 1).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = scaling["original_max_position_embeddings"]
    if kind == "dynamic":
        reach = max(length or original, original)
        base = theta * (factor * reach / original - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if kind == "longrope":
        stretch = scaling["long_factor"] if length is not None and length > original else scaling["short_factor"]
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        return 1.0 / (torch.tensor(stretch, dtype=torch.float32) * theta ** exponents), float(attention_factor)
    if kind == "llama3":
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        wavelength = 2 * math.pi / inv_freq
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        middle = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(middle, blended, scaled), 1.0
    if kind == "yarn":
        def dimension(rotations: float) -> float:  # the pair index that turns `rotations` times over `original`
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dimension(scaling.get("beta_fast", 32))), 0)
        high = min(math.ceil(dimension(scaling.get("beta_slow", 1))), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2).float() - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        attention_factor = scaling.get("attention_factor") or 0.1 * math.log(factor) + 1.0
        return inv_freq, float(attention_factor)
    raise ValueError(f"rope scaling {kind!r} is not supported; supported: {', '.join(ROPE_SCALING)}")


def relative_position_buckets(
    relative: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance (Raffel et al. 2020): bidirectional stacks give each sign half the
    buckets, causal ones only look back. Of a direction's b buckets, distances below b/2 have one each; longer ones
    share the rest logarithmically, everything from `max_distance` on falling into the last."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        buckets += (relative > 0).long() * n_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = n_buckets // 2
    # At distance 0 the logarithm is -inf; torch.where keeps the exact bucket there.
    logarithmic = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                           * (n_buckets - exact)).long()
    return buckets + torch.where(distance < exact, distance, logarithmic.clamp(max=n_buckets - 1))


class RelativePositionBias(nn.Module):
    """T5's attention bias: a learned scalar per head for each bucket of key-minus-query distance, computed once per
    forward and added to the scores of every layer of a stack (T5 computes it in the first layer and passes it on)."""

    def __init__(self, config: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = config.relative_buckets, config.relative_max_distance
        self.bias = nn.Embedding(config.relative_buckets, config.n_heads)

    def forward(self, q_len: int, kv_len: int, visible: torch.Tensor | None) -> torch.Tensor:
        """The additive mask [1 or B, H, q_len, kv_len] for queries at the last q_len of kv_len positions: the bias,
        and -inf where `visible` (booleans broadcasting to [B, 1, q_len, kv_len]) is False."""
        device = self.bias.weight.device
        keys = torch.arange(kv_len, device=device)
        relative = keys[None, :] - torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        buckets = relative_position_buckets(relative, self.bidirectional, self.n_buckets, self.max_distance)
        bias = self.bias(buckets).permute(2, 0, 1)[None]
        return bias if visible is None else bias.masked_fill(~visible, float("-inf"))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if (fused := native.inference_ops(x)) is not None and cos.dtype == sin.dtype == x.dtype and \
            x.stride(-1) == 1 and cos.shape[0] in (1, x.shape[0]):
        return fused.rotary(x, cos.contiguous(), sin.contiguous())  # the lines below in one pass
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer, preallocated: [n_layers, B, H_kv, capacity, d_k].

    `length` positions are filled; attention reads only that prefix, so a decode step costs what the context
    holds, not what the cache could hold. Nothing is allocated per token.

    Layers with the "local" pattern keep only their window instead: a ring of `attention_window` slots per layer
    (`window_keys`, `window_values`), slot s holding cache position p with p mod w = s. A model with any sparse
    pattern also records each cached key's token position (-1: padding or empty), from which its masks are built.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        patterns = config.layer_patterns()
        n_full = sum(pattern != "local" for pattern in patterns)
        shape = (n_full, batch_size, config.n_kv_heads, capacity, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0
        self.sparse = any(pattern != "dense" for pattern in patterns)
        if self.sparse:
            self.window = config.attention_window
            ring = (len(patterns) - n_full, batch_size, config.n_kv_heads, self.window, config.head_dim)
            self.window_keys = torch.zeros(ring, dtype=dtype, device=device)
            self.window_values = torch.zeros(ring, dtype=dtype, device=device)
            self.key_positions = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
            self.window_positions = torch.full((batch_size, self.window), -1, dtype=torch.long, device=device)
            self._new_positions: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, H_kv, T, d_k] after the filled prefix; return keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def write_columns(self, batch: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """For a decode step of `batch` rows: the column [B] each row writes its key/value at, how many columns
        attention reads, and each row's cache row [B] (None: row r is cache row r); the native decode kernel's
        view of `update`."""
        return torch.full((batch,), self.length, dtype=torch.long, device=self.keys.device), self.length + 1, None

    def advance(self, n_tokens: int) -> None:
        if self.sparse and self._new_positions is not None:
            self.window_positions = self._ring_write(self.window_positions, self._new_positions)
            self._new_positions = None
        self.length += n_tokens

    # ---- sparse patterns: the sliding-window ring and the positions of cached keys -------------------------------

    def record_positions(self, positions: torch.Tensor) -> None:
        """This step's token positions [B, T] (-1 for padding), before the layers run."""
        self.key_positions[:, self.length:self.length + positions.shape[1]] = positions
        self._new_positions = positions

    def full_key_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token positions of the keys a full-history layer attends to this step, and each query's own key index."""
        new = self._new_positions.shape[1]
        return self.key_positions[:, :self.length + new], torch.arange(self.length, self.length + new,
                                                                         device=self.key_positions.device)

    def window_key_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same for a windowed layer, in the order `update_window` returns its keys."""
        new = self._new_positions
        if new.shape[1] == 1:
            slot = self.length % self.window
            positions = self.window_positions.clone()
            positions[:, slot] = new[:, 0]
            return positions, torch.tensor([slot], device=new.device)
        return torch.cat([self.window_positions, new], dim=1), \
            torch.arange(self.window, self.window + new.shape[1], device=new.device)

    def update_window(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A windowed layer's step: one token is written into its ring slot and sees the ring; several see the
        ring followed by themselves, then their last w are written (what the next steps' windows need)."""
        if k.shape[2] == 1:
            slot = self.length % self.window
            self.window_keys[layer, :, :, slot] = k[:, :, 0]
            self.window_values[layer, :, :, slot] = v[:, :, 0]
            return self.window_keys[layer], self.window_values[layer]
        keys = torch.cat([self.window_keys[layer], k], dim=2)
        values = torch.cat([self.window_values[layer], v], dim=2)
        self.window_keys[layer] = self._ring_write(self.window_keys[layer], k, dim=2)
        self.window_values[layer] = self._ring_write(self.window_values[layer], v, dim=2)
        return keys, values

    def _ring_write(self, ring: torch.Tensor, new: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """`ring` with the last (up to w) of `new`, at cache positions length, length + 1, ..., in their slots."""
        count = min(new.shape[dim], self.window)
        start = self.length + new.shape[dim] - count
        slots = torch.arange(start, start + count, device=ring.device) % self.window
        return ring.index_copy(dim, slots, new.narrow(dim, new.shape[dim] - count, count))

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (in that order), as beam search does when beams are extended or dropped. With as
        many rows as before only the filled columns move (a step's copy is the text so far, not the capacity)."""
        if len(rows) == self.keys.shape[1] and not self.sparse:
            end = self.length
            self.keys[:, :, :, :end] = self.keys[:, rows, :, :end]
            self.values[:, :, :, :end] = self.values[:, rows, :, :end]
            return
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]
        if self.sparse:
            self.window_keys, self.window_values = self.window_keys[:, rows], self.window_values[:, rows]
            self.key_positions, self.window_positions = self.key_positions[rows], self.window_positions[rows]


class MultiHeadAttention(nn.Module):
    """MultiHead(X) = Concat(head_1, ..., head_h) W^O with head_i = Attention(X W_i^Q, X W_i^K, X W_i^V).

    `pattern` (sparkgpt/model/sparse.py) is fixed at construction: a sparse layer's `attend` takes a whole causal
    sequence through its block-skipping fast path and anything else (a cache, padding) through the masked
    reference with the mask the model built; a "local" layer keeps its keys in the cache's sliding-window ring.
    """

    def __init__(self, config: ModelConfig, layer_index: int, pattern: str = "dense") -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=config.bias)
        # qk_norm: normalising each head's q and k bounds the attention logits (Dehghani et al. 2023; Qwen3).
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.attend = ATTENTION_BACKENDS[config.attention_backend]
        if config.attn_logit_softcap is not None:  # SDPA's fused kernels take no transform of the scores
            self.attend = partial(eager_attention, cap=config.attn_logit_softcap)
        if config.attention_scale is not None:
            self.attend = partial(self.attend, scale=config.attention_scale)
        self.pattern = pattern
        # Row of this layer in the cache: full-history layers count among themselves, windowed ones in the ring.
        patterns = config.layer_patterns() if config.architecture == "decoder" else ["dense"] * config.n_layers
        self.windowed = pattern == "local"
        self.cache_index = sum((p == "local") == self.windowed for p in patterns[:layer_index])
        if pattern != "dense":
            self.attend = partial(_pattern_attention, pattern=pattern, window=config.attention_window,
                                  summary=config.fixed_summary, scale=config.attention_scale, masked=self.attend,
                                  fast=config.attn_logit_softcap is None)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q, k = self.queries(x), self.keys(x)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            if self.windowed:
                k, v = cache.update_window(self.cache_index, k, v)
            else:
                k, v = cache.update(self.cache_index, k, v)
        heads = self.attend(q, k, v, mask, is_causal)
        return self.o_proj(heads.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))


    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x W^Q as heads [B, H, T, d_k] (each normalised with qk_norm)."""
        q = self.q_proj(x).view(*x.shape[:2], self.n_heads, self.head_dim)
        return (q if self.q_norm is None else self.q_norm(q)).transpose(1, 2)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """x W^K as heads [B, H_kv, T, d_k] (each normalised with qk_norm)."""
        k = self.k_proj(x).view(*x.shape[:2], self.n_kv_heads, self.head_dim)
        return (k if self.k_norm is None else self.k_norm(k)).transpose(1, 2)


def _pattern_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, *,
    pattern: str, window: int, summary: int, scale: float | None, masked: Callable[..., torch.Tensor],
    fast: bool = True,
) -> torch.Tensor:
    """A sparse layer's attention: the fast path for a whole causal sequence, else the masked reference (always,
    when not `fast`: the block-skipping kernels cannot soft-cap the scores)."""
    if is_causal and fast:
        return sparse_attention(q, k, v, pattern, window, summary, scale)
    if is_causal:
        mask = pattern_mask(pattern, q.shape[2], k.shape[2], window, summary, q.device)
    return masked(q, k, v, mask, False)


class CrossAttention(MultiHeadAttention):
    """Encoder–decoder attention: queries from the decoder, keys and values from the encoder's output (memory)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's keys and values [B, H_kv, S, d_k]: computed once per source, reused at every decode step."""
        batch, length, _ = memory.shape
        v = self.v_proj(memory).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.keys(memory), v

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], memory_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """memory_mask: [B, 1, 1, S] booleans, True for real source tokens (None: no padding). Memory keys and
        values of batch 1 serve every row (beams of one source): the rows become query positions of one batch, so
        the memory is read once, not once per row (queries attend independently: the same result)."""
        batch, seq_len, _ = x.shape
        q = self.queries(x)
        shared = memory_kv[0].shape[0] == 1 and batch > 1 and (memory_mask is None or memory_mask.shape[0] == 1)
        if shared:
            q = q.transpose(0, 1).reshape(1, self.n_heads, batch * seq_len, self.head_dim)
        heads = self.attend(q, *memory_kv, memory_mask, False)
        if shared:
            heads = heads.reshape(self.n_heads, batch, seq_len, self.head_dim).transpose(0, 1)
        return self.o_proj(heads.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))
