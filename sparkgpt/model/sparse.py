"""Sparse attention patterns: which earlier positions j a query at position i may see, and fast paths that skip
the blocks a pattern masks out.

Every pattern is causal (j ≤ i) and then keeps, with w = attention_window:

    dense     every earlier position
    local     i - j < w                                   (sliding window; GPT-Neo's and GPT-3's local layers)
    strided   i - j < w  or  (i - j) mod w = 0            (Sparse Transformer, Child et al. 2019, §4.2: both heads'
    fixed     ⌊j / w⌋ = ⌊i / w⌋  or  j mod w ≥ w - c       sets as one pattern; c = fixed_summary)

`pattern_allows` is the definition; the masked reference is that boolean mask handed to ordinary attention
(`attention.eager_attention` / `sdpa_attention`). The fast paths compute exactly the same softmax over exactly the
same keys, but only over the blocks that hold a visible key:

- `local_attention_cpu`: the sliding window on the CPU. float32 goes through the native band kernel
  (csrc/local_attention.cpp: each chunk of 64 queries multiplies only the keys its band reaches, with the
  matrix library's GEMM on views of q, k and v and a vectorised softmax; its own backward), bfloat16 through the
  same band structure on the bf16 micro-kernel (`bf16_band_attention`, csrc/attention_bf16.cpp, which is also
  attention.py's causal attention for bf16 on the CPU). Otherwise, or without the native library, through
  PyTorch's flash-attention kernel: queries go in
  chunks of C; chunk c sees the keys of chunks c - p .. c (p = ⌈(w-1)/C⌉), a strided view of one zero-prefixed
  copy of the keys; one masked kernel call per batch row covers every chunk. Its backward is the kernel's own,
  with the key/value gradients of overlapping windows summed back. Time and memory grow as T · (w + C), not T².
- `block_sparse_attention`: any pattern, on any device. The sequence is cut into blocks; for each query block the
  key blocks holding a visible key are gathered (their list is worked out per pattern from the block layout) and
  attention runs over those alone, with the element mask inside them. Autograd does the backward.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch.nn import functional as F

import sparkgpt.model.native as native
from sparkgpt.config import ATTENTION_PATTERNS as PATTERNS


def pattern_allows(pattern: str, i: torch.Tensor, j: torch.Tensor, window: int, summary: int = 1) -> torch.Tensor:
    """True where a query at position i may see a key at position j (tensors that broadcast)."""
    causal = j <= i
    if pattern == "dense":
        return causal
    distance = i - j
    if pattern == "local":
        return causal & (distance < window)
    if pattern == "strided":
        return causal & ((distance < window) | (distance % window == 0))
    if pattern == "fixed":
        return causal & ((torch.div(j, window, rounding_mode="floor") == torch.div(i, window, rounding_mode="floor"))
                         | (j % window >= window - summary))
    raise ValueError(f"unknown attention pattern {pattern!r}; expected one of {PATTERNS}")


def pattern_mask(
    pattern: str, q_len: int, kv_len: int, window: int, summary: int, device: torch.device
) -> torch.Tensor:
    """[q_len, kv_len] booleans for queries at the last q_len of kv_len positions (the masked reference's mask)."""
    i = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return pattern_allows(pattern, i, j, window, summary)


def position_mask(
    pattern: str, query_positions: torch.Tensor, key_positions: torch.Tensor, self_index: torch.Tensor,
    window: int, summary: int,
) -> torch.Tensor:
    """[B, 1, T, S] booleans from token positions: queries [B, T], keys [B, S] (-1 for padding or an empty cache
    slot). `self_index` [T] is where each query's own key sits among the S: a padding query sees only itself, so
    softmax never meets a row of nothing (its output is never used)."""
    allowed = pattern_allows(pattern, query_positions[:, :, None], key_positions[:, None, :], window, summary)
    allowed &= key_positions[:, None, :] >= 0
    allowed[:, torch.arange(len(self_index), device=allowed.device), self_index] = True
    return allowed[:, None]


# ---- the sliding window on the CPU: flash-attention kernel over strided chunk windows ---------------------------

NATIVE_CHUNK = 64  # the native kernel's query chunk: 64 and 128 measured alike; 64 wastes fewer keys
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def local_chunk_size(window: int) -> int:
    """Query chunk length for a window: a power of two in [16, 128] near w (larger chunks waste more keys)."""
    return min(128, max(16, 1 << (window - 1).bit_length()))


class _LocalWindowAttention(torch.autograd.Function):
    """softmax(Q Kᵀ · scale + M_local) V for q, k, v [B, H, T, d] with T a multiple of the chunk length.

    K and V are copied once into rows [B, p·C + T, H, d] that start with p chunks of zeros, so window c (the keys
    of query chunk c) is rows [c·C, (c + p + 1)·C) of that copy for every c: one strided view, one kernel call per
    batch row, and the output comes back in its final layout. The masks of the first p chunks also hide the zero
    rows. Few, large operations matter here: with two threads on a busy CPU every parallel operation waits for
    the second thread to be scheduled, so each extra copy or addition costs far more than its memory traffic.
    """

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float, chunk: int):
        batch, heads, length, head_dim = q.shape
        n_chunks, reach = length // chunk, math.ceil((window - 1) / chunk)  # earlier chunks a query can see
        # Rows [B, T, H, d]: the layout the q/k/v projections produce, so q's are a view, not a copy.
        # contiguous: with p = 0 the pad is the input itself, which the windows' strides must not assume
        k_padded, v_padded = (F.pad(t.transpose(1, 2), (0, 0, 0, 0, reach * chunk, 0)).contiguous() for t in (k, v))
        mask = _window_mask(chunk, reach, window, n_chunks, q.dtype, q.device)
        outs, lses = [], []
        for b in range(batch):
            qw, kw, vw = _windows(q[b], k_padded[b], v_padded[b], chunk, reach)
            out, lse = _flash_forward(qw, kw, vw, attn_mask=mask, scale=scale)
            outs.append(out)
            lses.append(lse)
        ctx.save_for_backward(q, k_padded, v_padded, *outs, *lses)
        ctx.window, ctx.scale, ctx.chunk = window, scale, chunk
        # out [n, H, C, d] is laid out as [n, C, H, d]: a row's chunks are its T rows in order.
        rows = torch.stack([o.transpose(1, 2) for o in outs]) if batch > 1 else outs[0].transpose(1, 2)[None]
        return rows.view(batch, length, heads, head_dim).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        chunk, window = ctx.chunk, ctx.window
        q, k_padded, v_padded, *saved = ctx.saved_tensors
        batch, heads, length, head_dim = q.shape
        n_chunks, reach = length // chunk, math.ceil((window - 1) / chunk)
        outs, lses = saved[:batch], saved[batch:]
        mask = _window_mask(chunk, reach, window, n_chunks, q.dtype, q.device)
        grad_q, grad_k, grad_v = [], [], []
        for b in range(batch):
            qw, kw, vw = _windows(q[b], k_padded[b], v_padded[b], chunk, reach)
            go = grad[b].transpose(0, 1).reshape(n_chunks, chunk, heads, head_dim).transpose(1, 2)
            gq, gk, gv = _flash_backward(go, qw, kw, vw, outs[b], lses[b], 0.0, False, attn_mask=mask,
                                         scale=ctx.scale)
            grad_q.append(gq.transpose(1, 2))
            grad_k.append(_fold_windows(gk, reach))
            grad_v.append(_fold_windows(gv, reach))
        grads = [torch.stack(g) if batch > 1 else g[0][None] for g in (grad_q, grad_k, grad_v)]
        return *(g.reshape(batch, length, heads, head_dim).transpose(1, 2) for g in grads), None, None, None


def _windows(q, k_padded, v_padded, chunk: int, reach: int):
    """One batch row's query chunks [n, H, C, d] (q [H, T, d]) and key/value windows [n, H, (p + 1)·C, d], strided
    views of the zero-prefixed rows [p·C + T, H, d]."""
    heads, length, head_dim = q.shape
    n_chunks, row = length // chunk, heads * head_dim
    qw = q.transpose(0, 1).reshape(n_chunks, chunk, heads, head_dim).transpose(1, 2)
    shape, stride = (n_chunks, (reach + 1) * chunk, heads, head_dim), (chunk * row, row, head_dim, 1)
    kw = k_padded.as_strided(shape, stride, k_padded.storage_offset()).transpose(1, 2)
    vw = v_padded.as_strided(shape, stride, v_padded.storage_offset()).transpose(1, 2)
    return qw, kw, vw


def _fold_windows(grad_windows: torch.Tensor, reach: int) -> torch.Tensor:
    """Sum the kernel's gradients of the overlapping windows [n, H, (p + 1)·C, d] into rows [n, C, H, d].

    Piece s of window c is padded chunk c + s, real chunk c + s - p: the last pieces (s = p) tile the sequence once
    and are copied, the others are added where they land on a real chunk (the zero prefix's gradient is dropped).
    """
    n_chunks, heads, span, head_dim = grad_windows.shape
    chunk = span // (reach + 1)
    pieces = grad_windows.transpose(1, 2).view(n_chunks, reach + 1, chunk, heads, head_dim)
    rows = pieces[:, reach].contiguous()
    for s in range(reach):
        rows[:n_chunks - reach + s] += pieces[reach - s:, s]
    return rows


@lru_cache(maxsize=4)
def _window_mask(chunk: int, reach: int, window: int, n_chunks: int, dtype: torch.dtype, device: torch.device):
    """0 where query a of chunk c sees key b of its window, -inf elsewhere: [n, 1, C, (p + 1)·C] (the kernel takes
    one mask per batch entry or one for all). Chunks from p on have the same mask; the first p also hide the zero
    rows before position 0. T · (p + 1)·C floats, so only the last few lengths are kept."""
    i = torch.arange(chunk, device=device)[:, None] + reach * chunk  # the query's row within the window
    j = torch.arange((reach + 1) * chunk, device=device)[None, :]
    head = min(reach, n_chunks)
    visible = pattern_allows("local", i, j, window).expand(head + 1, chunk, (reach + 1) * chunk).clone()
    for c in range(head):  # chunk c's window starts (reach - c) chunks before position 0
        visible[c, :, :(reach - c) * chunk] = False
    masks = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))
    return torch.cat([masks[:head], masks[head:].expand(n_chunks - head, -1, -1)])[:, None]


def local_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                        scale: float | None = None) -> torch.Tensor:
    """Sliding-window causal attention on the CPU; q, k, v [B, H, T, d] (same head count). float32 takes the
    native band kernel where it is built (`_NativeBandAttention`), anything else the flash-kernel chunks."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dtype == torch.bfloat16 and (out := bf16_band_attention(q, k, v, window, scale)) is not None:
        return out
    ops = native.ops() if q.dtype == torch.float32 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 else None
    if ops is not None:
        return _NativeBandAttention.apply(q, k, v, window, scale, ops, "local_attention")
    chunk = local_chunk_size(window)
    length = q.shape[2]
    pad = -length % chunk
    if pad:  # the extra queries at the end see real keys and are dropped; real queries never see the extra keys
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    out = _LocalWindowAttention.apply(q, k, v, window, scale, chunk)
    return out[:, :, :length] if pad else out


def bf16_band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                        scale: float | None = None) -> torch.Tensor | None:
    """Causal attention (window = T) or a sliding window on the CPU in bfloat16 with float32 sums, through
    csrc/attention_bf16.cpp; q [B, H, T, d], k, v [B, H_kv, T, d] (grouped-query heads are not repeated), any
    float dtype (cast to bf16; the result is bf16). None where the native library is not built or this CPU and
    torch build lack the bf16 micro-kernel, so the caller takes another path."""
    if not native.bf16_attention_supported() or q.shape[-1] % 2 or q.shape[2] != k.shape[2]:
        return None
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = (t.to(torch.bfloat16) if t.stride(-1) == 1 else t.to(torch.bfloat16).contiguous() for t in (q, k, v))
    return _NativeBandAttention.apply(q, k, v, window, scale, native.ops(), "attention_bf16")


class _NativeBandAttention(torch.autograd.Function):
    """A native band kernel's forward and backward: `kernel` "local_attention" (csrc/local_attention.cpp, float32:
    chunks of NATIVE_CHUNK queries times the keys their band reaches, GEMMs on views of q, k, v) or
    "attention_bf16" (csrc/attention_bf16.cpp: the same on the bf16 micro-kernel with float32 sums). The forward
    saves the log-sum-exp its backward needs."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float, ops, kernel: str):
        chunk = (NATIVE_CHUNK,) if kernel == "local_attention" else ()  # the bf16 kernel's chunk is fixed
        out, lse = getattr(ops, f"{kernel}_forward")(q, k, v, window, scale, *chunk)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.scale, ctx.backward_op, ctx.chunk = window, scale, getattr(ops, f"{kernel}_backward"), chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grads = ctx.backward_op(grad, q, k, v, out, lse, ctx.window, ctx.scale, *ctx.chunk)
        return *grads, None, None, None, None


# ---- any pattern: gather the visible key blocks of each query block ----------------------------------------------

def block_layout(pattern: str, n_blocks: int, block: int, window: int, summary: int,
                 device: torch.device) -> torch.Tensor:
    """[n, n] booleans: True where query block a and key block b hold at least one visible (i, j) pair."""
    a = torch.arange(n_blocks, device=device)[:, None]
    b = torch.arange(n_blocks, device=device)[None, :]
    causal = b <= a
    if pattern == "dense":
        return causal
    # Over the tile, i - j runs from (a - b)·block - (block - 1) to (a - b)·block + (block - 1).
    low = ((a - b) * block - (block - 1)).clamp(min=0)
    high = (a - b) * block + (block - 1)
    near = causal & (low < window)
    if pattern == "local":
        return near
    if pattern == "strided":
        return near | (causal & (torch.div(high, window, rounding_mode="floor") * window >= low))
    # fixed: some j of the tile shares i's w-block, or some j of the tile is a summary position.
    same_block = torch.div(b * block + block - 1, window, rounding_mode="floor") >= \
        torch.div(a * block, window, rounding_mode="floor")
    start = b * block % window
    summary_in_tile = (start >= window - summary) | (window - summary - start <= block - 1)
    return causal & (same_block | summary_in_tile)


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, window: int, summary: int = 1,
    scale: float | None = None, block: int = 64,
) -> torch.Tensor:
    """Causal attention under `pattern` over only the key blocks that hold a visible key; q, k, v [B, H, T, d]."""
    batch, heads, length, head_dim = q.shape
    n_blocks = math.ceil(length / block)
    pad = n_blocks * block - length
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    layout = block_layout(pattern, n_blocks, block, window, summary, q.device)
    per_row = int(layout.sum(dim=1).max())
    # The visible key blocks of each query block, in order, padded with a slot marked empty.
    order = torch.where(layout, torch.arange(n_blocks, device=q.device), n_blocks).sort(dim=1).values[:, :per_row]
    present = order < n_blocks
    order = order.clamp(max=n_blocks - 1)
    k_blocks = k.view(batch, heads, n_blocks, block, head_dim)[:, :, order].flatten(3, 4)
    v_blocks = v.view(batch, heads, n_blocks, block, head_dim)[:, :, order].flatten(3, 4)
    i = torch.arange(n_blocks * block, device=q.device).view(n_blocks, block, 1)
    j = (order[:, :, None] * block + torch.arange(block, device=q.device)).view(n_blocks, 1, per_row * block)
    visible = pattern_allows(pattern, i, j, window, summary) & present.repeat_interleave(block, dim=1)[:, None, :]
    out = F.scaled_dot_product_attention(q.view(batch, heads, n_blocks, block, head_dim), k_blocks, v_blocks,
                                         attn_mask=visible, scale=scale)
    return out.reshape(batch, heads, n_blocks * block, head_dim)[:, :, :length]


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, window: int, summary: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """The fast path for a whole causal sequence (no cache, no padding): q [B, H, T, d], k, v [B, H_kv, T, d]."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    length = q.shape[2]
    if pattern == "dense" or (pattern == "local" and length <= window) or \
            (pattern == "strided" and length <= window + 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # nothing to skip
    if pattern == "local" and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        return local_attention_cpu(q, k, v, window, scale)
    return block_sparse_attention(q, k, v, pattern, window, summary, scale)
