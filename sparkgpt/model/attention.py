"""Attention: the math, its fast path, rotary positions and the KV cache.

Attention(Q, K, V) = softmax(Q Kᵀ / √d_k + M) V, where the mask M is 0 where a query may look and -∞ where
it may not (the future, and padding). `eager_attention` is that formula line for line; `sdpa_attention` hands
the same computation to PyTorch's fused kernels. Both take queries [B, H, T, d_k] and keys/values
[B, H_kv, S, d_k] with H a multiple of H_kv (grouped-query attention: each key/value head serves H / H_kv
query heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from sparkgpt.config import ModelConfig


def repeat_kv(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B, H_kv, S, d] -> [B, H_kv * group_size, S, d]: each key/value head repeated for its query heads."""
    return x if group_size == 1 else x.repeat_interleave(group_size, dim=1)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] booleans, True where query i (the last q_len of kv_len positions) may see key j."""
    offset = kv_len - q_len
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=offset)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """The reference: softmax(Q Kᵀ / √d_k + M) V, written out."""
    group_size = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, group_size), repeat_kv(v, group_size)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """The same computation through torch's scaled_dot_product_attention (flash / memory-efficient kernels)."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if q_len == 1 and n_heads != n_kv_heads:
        # One new token sees every cached key, so the query heads that share a key/value head can ride along
        # the query axis of that head: no copy of K and V per decode step.
        grouped = q.view(batch, n_kv_heads, n_heads // n_kv_heads, head_dim)
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).view(batch, n_heads, 1, head_dim)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=n_heads != n_kv_heads
    )


ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"eager": eager_attention, "sdpa": sdpa_attention}


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles: the pair (x_i, x_{i+d/2}) of each head turns by p · θ^(-2i/d) at position p.

    Returns cos and sin [B, 1, T, d] for positions [B, T], to broadcast over heads. Computed per forward
    (a few tiny ops) rather than cached, so the model holds no buffers and can be built on the meta device.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer, preallocated: [n_layers, B, H_kv, capacity, d_k].

    `length` positions are filled; attention reads only that prefix, so a decode step costs what the context
    holds, not what the cache could hold. Nothing is allocated per token.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, capacity, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, H_kv, T, d_k] after the filled prefix; return keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens


class MultiHeadAttention(nn.Module):
    """MultiHead(X) = Concat(head_1, ..., head_h) W^O with head_i = Attention(X W_i^Q, X W_i^K, X W_i^V)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=config.bias)
        self.attend = ATTENTION_BACKENDS[config.attention_backend]

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        heads = self.attend(q, k, v, mask, is_causal)
        return self.o_proj(heads.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))
