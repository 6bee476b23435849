"""The lean decode step: one new token per row through a decoder-only GPT, in as few operations as possible.

`GPT.forward` reads like the math and serves every case (training, prefill, padding, sparse patterns, experts).
A decode step runs the same math for one token per row, hundreds of times per reply, where each small operation's
dispatch (a few µs on a CPU) adds up: the general forward spends about 50 of them per layer. This step, built once
per model, spends about 20:

- RMSNorm in five small ops on a float32 residual stream (a quantised model's too: its kernels take bf16 rows);
- rotary angles looked up in a table built once (not recomputed per step), q and k turned together in three ops
  (x·cos + flip(x)·sin±, with the sign of the half-rotation folded into the table);
- quantised models project q, k, v with one fused int8/int4 matrix and gate/up with another (the separate layers'
  tensors become row views of the fused ones, so nothing is stored twice);
- keys/values are written into the preallocated cache and attention reads its filled prefix only, with the query
  heads that share a key/value head folded into one SDPA call (no copy of K and V).

Every row feeds one token at its own position; `mask` ([B, 1, 1, S] booleans, True where a row may look) covers
left padding and the serving engine's per-row slots, or is None when every row sees the whole prefix.

Gemma's additions ride along as per-layer options: embeddings × √d_model, q/k norms, sandwich norms (each
sub-layer's output normalised before it joins the stream), GeGLU, and sliding-window layers, which keep their keys
in the cache's ring (`KVCache.update_window`) and turn at their own rope base.

Even 20 operations a layer leave a quantised model's step spending as long in dispatch as in its integer kernels.
So where every block is a quantised Llama- or Gemma-family block on the CPU, the loop below runs as one native call
(csrc/decode_layers.cpp, built on first use; see `native`): the same kernels, with norms, rotary, cache writes and
attention as plain loops. This loop stays the reference (tests/test_native.py) and the path for everything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from sparkgpt.model import native
from sparkgpt.model.attention import KVCache, rope_depends_on_length, rotary_cos_sin
from sparkgpt.model.layers import GeGLUFFN, RMSNorm, SwiGLUFFN
from sparkgpt.model.quant import DECODE_ROWS, KERNELS, QuantizedLinear, fuse_rows, is_quantized


def _norm(module: nn.Module, residual_dtype: torch.dtype):
    """The norm on rows of the residual stream. Float32 rows: RMSNorm in five ops (its module also casts to and
    from float32 for bf16 activations; F.rms_norm measured slower here, doing the same casts internally), and
    LayerNorm with float32 copies of its (possibly bf16) gain and bias. Otherwise the module itself."""
    if residual_dtype != torch.float32:
        return module
    if isinstance(module, RMSNorm):
        weight, eps = module.weight.float(), module.eps
        return lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * weight
    if isinstance(module, nn.LayerNorm):
        weight, bias = (None if t is None else t.float() for t in (module.weight, module.bias))
        return lambda x: F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    return module


def _fused(layers: list[nn.Module]) -> QuantizedLinear | None:
    """One quantised layer over the rows of `layers` when they are plain quantised layers of one kind."""
    first = layers[0]
    same = all(type(layer) is QuantizedLinear and layer.method == first.method
               and layer.group_size == first.group_size and (layer.bias is None) == (first.bias is None)
               and layer.int8_activations == first.int8_activations
               for layer in layers)
    return fuse_rows(layers) if same else None


def _linear(module: nn.Module | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A projection as the step calls it: a plain quantised layer's bare kernel, a plain float Linear's native
    matrix–vector product where this CPU runs it faster (`native.matvec`), else the module itself (a wrapper such
    as LoRA's, whose own forward must run)."""
    if module is None:
        return None
    if type(module) is QuantizedLinear:
        return module.row_kernel() or module
    weight = getattr(module, "weight", None)
    if (type(module) is nn.Linear and weight.device.type == "cpu" and weight.is_contiguous()
            and (product := native.matvec(weight.dtype)) is not None):
        bias = module.bias  # more rows than DECODE_ROWS (a large batch) are a matrix product: torch's GEMM
        return lambda x: (product(x, weight, bias) if x.dtype == weight.dtype and x.shape[0] <= DECODE_ROWS
                          and not torch.is_grad_enabled() else module(x))
    return module


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class _Layer:
    """One block's projections (fused where possible) and norms, as the step calls them on rows [B, d]."""

    def __init__(self, block: nn.Module, residual_dtype: torch.dtype, local_base: bool) -> None:
        attn, ffn = block.attn, block.ffn
        self.attn_norm, self.ffn_norm = _norm(block.attn_norm, residual_dtype), _norm(block.ffn_norm, residual_dtype)
        # sandwich norms (Gemma): each sub-layer's output is normalised before it joins the stream
        self.attn_post_norm, self.ffn_post_norm = (
            (_norm(block.attn_post_norm, residual_dtype), _norm(block.ffn_post_norm, residual_dtype))
            if block.sandwich else (None, None))
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.windowed, self.cache_index = attn.windowed, attn.cache_index
        self.rotation = "local" if attn.windowed and local_base else "global"  # which rope base turns q and k
        fused_qkv = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.qkv = _linear(fused_qkv)
        self.q_proj, self.k_proj, self.v_proj = (_linear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.o_proj = _linear(attn.o_proj)
        self.gated = isinstance(ffn, SwiGLUFFN)  # SwiGLU, or GeGLU (its subclass)
        self.activation = _gelu_tanh if isinstance(ffn, GeGLUFFN) else F.silu
        fused_gate_up = _fused([ffn.gate_proj, ffn.up_proj]) if self.gated else None
        self.gate_up = _linear(fused_gate_up)
        self.gate_proj, self.up_proj = (_linear(ffn.gate_proj), _linear(ffn.up_proj)) if self.gated else (None, None)
        self.down_proj = _linear(ffn.down_proj) if self.gated else None
        self.ffn = ffn
        self.native = self._native_operands(block, [fused_qkv, attn.o_proj, fused_gate_up,
                                                    ffn.down_proj if self.gated else None])

    @staticmethod
    def _native_operands(block: nn.Module, projections: list[nn.Module | None]) -> tuple[list, list, int] | None:
        """What the native kernel takes for this block: its tensors in csrc/decode_layers.cpp's order (an empty
        tensor for a norm the block does not have), each projection's kernel (`quant.KERNELS`) and the int4 group
        size; None unless every norm is an RMSNorm of one eps, the FFN is gated and the four projections are plain
        bias-free quantised ones with decode kernels (`QuantizedLinear.kernel_operands`)."""
        attn = block.attn
        optional = [attn.q_norm, attn.k_norm, *((block.attn_post_norm, block.ffn_post_norm) if block.sandwich
                                                else (None, None))]
        norms = [block.attn_norm, block.ffn_norm, *(n for n in optional if n is not None)]
        if not all(type(norm) is RMSNorm for norm in norms) or not all(
                type(p) is QuantizedLinear and p.bias is None for p in projections):
            return None
        operands = [p.kernel_operands() for p in projections]
        group_sizes = {p.group_size for p in projections if p.method == "int4"}
        if any(o is None for o in operands) or len(group_sizes) > 1 or len({n.eps for n in norms}) > 1:
            return None
        attn_norm, ffn_norm, *extra = (torch.empty(0) if norm is None else norm.weight.float().contiguous()
                                       for norm in (block.attn_norm, block.ffn_norm, *optional))
        (qkv, qkv_scales), (out, out_scales), (gate_up, gate_up_scales), (down, down_scales) = operands
        tensors = [attn_norm, qkv, qkv_scales, out, out_scales, ffn_norm, gate_up, gate_up_scales, down, down_scales,
                   *extra]
        return tensors, [KERNELS[p.kernel_name] for p in projections], next(iter(group_sizes), 0)


class DecodeStep:
    """Logits [B, vocab] for one new token per row: `step(tokens [B], positions [B], cache, mask)`."""

    def __init__(self, model: nn.Module) -> None:
        config = self.config = model.config
        self.model = model
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.scale = config.attention_scale
        self.embedding_scale = math.sqrt(config.d_model) if config.scale_embeddings else None
        # A quantised model's integer kernels take and give bf16 rows whatever its float dtype; its residual stream
        # stays float32 here (a bf16 model's too: its norms, q/k/v and KV cache stay bf16): converting each
        # kernel's input costs no more than converting its output would, and the rows keep their precision.
        self.residual_dtype = torch.float32 if is_quantized(model) else model.final_norm.weight.dtype
        local_base = config.rope_local_theta is not None
        self.layers = [_Layer(block, self.residual_dtype, local_base) for block in model.blocks]
        self.final_norm = _norm(model.final_norm, self.residual_dtype)
        # a quantised head keeps its forward (float32 logits); a float one may take the native matrix–vector product
        self.head = model.lm_head if type(model.lm_head) is QuantizedLinear else _linear(model.lm_head)
        self.rope = config.positions == "rope"
        # The rope bases: (theta, scaling) of every layer, and the sliding-window layers' own, unscaled (Gemma 3).
        self.bases = {"global": (config.rope_theta, config.rope_scaling)}
        if local_base:
            self.bases["local"] = (config.rope_local_theta, None)
        # dynamic / longrope: a position's angles depend on how far the step reaches, so no table of them
        self.rope_per_step = self.rope and rope_depends_on_length(config.rope_scaling)
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.windowed = any(layer.windowed for layer in self.layers)
        self.signature = parameter_signature(model)
        self.native = self._native_kernel()

    def _native_kernel(self) -> tuple | None:
        """(op, tensors, kernels, group size, eps, windowed layers, activation) for csrc/decode_layers.cpp where every
        block qualifies (a quantised Llama- or Gemma-family model on the CPU, float32 residual) and the kernel
        builds; else None."""
        blocks = [layer.native for layer in self.layers]
        if (self.residual_dtype != torch.float32 or not self.rope or not all(blocks)
                or len({group for *_, group in blocks if group}) > 1
                or len({block.attn_norm.eps for block in self.model.blocks}) > 1
                or self.model.final_norm.weight.device.type != "cpu"):
            return None
        ops = native.ops()
        if ops is None:
            return None
        group_size = max(group for *_, group in blocks)
        tensors = [t for block_tensors, _, _ in blocks for t in block_tensors]
        kernels = [k for _, block_kernels, _ in blocks for k in block_kernels]
        windowed = [int(layer.windowed) for layer in self.layers]
        return (ops.decode_layers, tensors, kernels, group_size, self.model.blocks[0].attn_norm.eps, windowed,
                int(self.config.ffn == "geglu"))

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Decoder-only, pre-norm, with dense or sliding-window attention in every layer and GPT-2's, Llama's or
        Gemma's embedding and final norm: what the loop below computes. The rest (other sparse patterns, post-norm
        blocks, sinusoidal positions, typed or normalised embeddings, no final norm, soft-capped scores or logits)
        takes the general forward, which `embed` serves."""
        config = getattr(model, "config", None)
        return (config is not None and config.architecture == "decoder" and hasattr(model, "lm_head")
                and all(p in ("dense", "local") for p in config.layer_patterns()) and config.norm_position == "pre"
                and config.positions in ("learned", "rope") and config.final_norm
                and (config.rope_local_theta is None or config.positions == "rope")
                and not config.embedding_norm and not config.type_vocab_size
                and config.attn_logit_softcap is None and config.final_logit_softcap is None)

    def _rotations(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos and signed sin [B, d] at each row's position, per rope base, from tables built once (grown by
        doubling); a length-dependent rope's computed each step."""
        rotations, furthest = {}, int(positions.max())
        for kind, (theta, scaling) in self.bases.items():
            if self.rope_per_step and kind == "global":
                rotations[kind] = self._angles(positions, dtype, theta, scaling)
                continue
            table = self._tables.get(kind)
            if table is None or table[0].shape[0] <= furthest or table[0].device != positions.device \
                    or table[0].dtype != dtype:
                size = max(furthest + 1, 2 * (0 if table is None else table[0].shape[0]), 256)
                size = min(size, max(self.config.max_seq_len, furthest + 1))
                table = self._tables[kind] = self._angles(torch.arange(size, device=positions.device), dtype,
                                                          theta, scaling)
            rotations[kind] = table[0][positions], table[1][positions]
        return rotations

    def _angles(self, positions: torch.Tensor, dtype: torch.dtype, theta: float,
                scaling: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [N, d] at positions [N] (a length-dependent rope reaches the furthest of them)."""
        cos, sin = rotary_cos_sin(positions[None], self.head_dim, theta, scaling)
        cos, sin = cos[0, 0], sin[0, 0]
        half = self.head_dim // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # rotate_half's sign, folded in
        return cos.to(dtype), sin.to(dtype)

    def _ring(self, cache: KVCache, positions: torch.Tensor, ragged: bool) -> tuple[int, torch.Tensor | None]:
        """Record this step's positions in the cache (its sliding-window layers' masks are built from them) and
        give the ring columns this step's window reads, [0, min(filled + 1, w)), with which of them each row may
        see ([B, span] booleans, or None when every one holds a real token: no row has padding)."""
        cache.record_positions(positions[:, None])  # a decode token is never padding
        span = min(cache.length + 1, cache.window)
        if not ragged:
            return span, None
        ring_positions, _ = cache.window_key_positions()
        return span, ring_positions[:, :span] >= 0

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 mask: torch.Tensor | None = None, logit_rows: list[int] | None = None) -> torch.Tensor:
        """`logit_rows`: the rows whose logits are wanted (default all): a prompt's chunk fed as rows needs only
        its last row's, and the head is a step's largest matrix."""
        model, batch = self.model, tokens.shape[0]
        n_heads, n_kv, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        x = model.token_embedding(tokens)
        if self.embedding_scale is not None:
            x = x * self.embedding_scale
        x = x.to(self.residual_dtype)  # [B, d]: one row per sequence throughout
        heads_dtype = cache.keys.dtype  # q, k, v and attention: the cache's dtype
        native_cache = self.native is not None and heads_dtype in (torch.float32, torch.bfloat16)
        rotations = {}
        if self.rope:
            table_dtype = torch.float32 if native_cache else heads_dtype  # the native kernel rotates in float32
            rotations = self._rotations(positions, table_dtype)
        else:
            x = x + model.position_embedding(positions)
        ring_span, ring_visible = self._ring(cache, positions, mask is not None) if cache.sparse else (0, None)
        if native_cache:
            x = self._native_layers(x, rotations, cache, mask, ring_span, ring_visible)
            return self.head(self.final_norm(x if logit_rows is None else x[logit_rows]))
        ring_mask = None if ring_visible is None else ring_visible[:, None, None, :]
        group = n_heads // n_kv
        for layer in self.layers:
            h = layer.attn_norm(x)
            if layer.qkv is not None:
                qkv = layer.qkv(h).to(heads_dtype).view(batch, n_heads + 2 * n_kv, head_dim)
                qk, v = qkv[:, :n_heads + n_kv], qkv[:, n_heads + n_kv:]
            else:
                qk = torch.cat([layer.q_proj(h), layer.k_proj(h)], dim=-1).to(heads_dtype).view(
                    batch, n_heads + n_kv, head_dim)
                v = layer.v_proj(h).to(heads_dtype).view(batch, n_kv, head_dim)
            if layer.q_norm is not None:
                qk = torch.cat([layer.q_norm(qk[:, :n_heads]), layer.k_norm(qk[:, n_heads:])], dim=1)
            if self.rope:
                cos, sin = (t[:, None, :] for t in rotations[layer.rotation])  # [B, 1, d_k]
                flipped = qk.view(batch, n_heads + n_kv, 2, head_dim // 2).flip(2).view(qk.shape)
                qk = torch.addcmul(qk * cos, flipped, sin)
            q, k = qk[:, :n_heads], qk[:, n_heads:]
            if layer.windowed:
                keys, values = cache.update_window(layer.cache_index, k[:, :, None], v[:, :, None])
                keys, values, layer_mask = keys[:, :, :ring_span], values[:, :, :ring_span], ring_mask
            else:
                (keys, values), layer_mask = cache.update(layer.cache_index, k[:, :, None], v[:, :, None]), mask
            # The query heads of one key/value head ride along SDPA's query axis: [B, H_kv, group, d].
            heads = F.scaled_dot_product_attention(q.reshape(batch, n_kv, group, head_dim), keys, values,
                                                   attn_mask=layer_mask, scale=self.scale)
            attended = layer.o_proj(heads.view(batch, n_heads * head_dim))
            x = x + (attended if layer.attn_post_norm is None else
                     layer.attn_post_norm(attended.to(self.residual_dtype)))
            h = layer.ffn_norm(x)
            if layer.gated:
                gate, up = layer.gate_up(h).chunk(2, dim=-1) if layer.gate_up is not None else (
                    layer.gate_proj(h), layer.up_proj(h))
                fed = layer.down_proj(layer.activation(gate) * up)
            else:
                fed = layer.ffn(h)
            x = x + (fed if layer.ffn_post_norm is None else layer.ffn_post_norm(fed.to(self.residual_dtype)))
        cache.advance(1)
        return self.head(self.final_norm(x if logit_rows is None else x[logit_rows]))

    def _native_layers(self, x: torch.Tensor, rotations: dict, cache: KVCache, mask: torch.Tensor | None,
                       ring_span: int, ring_visible: torch.Tensor | None) -> torch.Tensor:
        """Every block through csrc/decode_layers.cpp: the loop above, with the same kernels, in one call."""
        op, tensors, kernels, group_size, eps, windowed, activation = self.native
        batch = x.shape[0]
        columns, span, slots = cache.write_columns(batch)
        visible = None if mask is None else mask.reshape(batch, span)
        if visible is not None and visible.stride(-1) != 1:
            visible = visible.contiguous()
        scale = self.head_dim ** -0.5 if self.scale is None else self.scale
        cos, sin = rotations["global"]
        local_cos, local_sin = rotations.get("local", (None, None))
        ring_keys, ring_values = (cache.window_keys, cache.window_values) if self.windowed else (None, None)
        ring_column = cache.length % cache.window if self.windowed else 0
        x = op(x.contiguous(), cos, sin, cache.keys, cache.values, columns, slots, span, visible, tensors, kernels,
               self.n_heads, self.n_kv_heads, group_size, eps, scale, local_cos, local_sin, ring_keys, ring_values,
               ring_column, ring_span, ring_visible, windowed, activation)
        cache.advance(1)
        return x


def parameter_signature(model: nn.Module) -> tuple:
    """Identities, dtypes and devices of the model's tensors: a step built for one set of weights is rebuilt if
    any is replaced or converted (`model.to(dtype)` keeps each Parameter object but changes its data)."""
    return tuple((id(t), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def decode_step(model: nn.Module) -> DecodeStep | None:
    """The model's lean step (built on first use, kept on the model), or None if the model needs the general
    forward."""
    if not DecodeStep.supports(model):
        return None
    step = model.__dict__.get("_decode_step")
    if step is None or step.signature != parameter_signature(model):
        step = DecodeStep(model)
        model.__dict__["_decode_step"] = step
    return step


# ---- the weight layout of batched decode steps on a CPU ------------------------------------------------------

class PackedHead(nn.Module):
    """The output head (a float32 Linear on CPU) multiplying several rows through oneDNN, its weight reordered once.

    The head (vocab × d_model) is the largest matrix of a small model's decode step, and oneDNN's blocked layout
    (packed for 8 rows) multiplies several rows by it faster than MKL on the column-major weight (benchmarks/
    RESULTS.md, "Figures behind choices in the code"); one row is as fast through MKL's matrix-vector path, so it
    stays there. The price is a second copy of the head's weight. `weight` stays the same Parameter, so a tied
    embedding, the state dict and the decode step's signature are unchanged; the copy is not refreshed if the
    weight changes later."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = head.weight, head.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(head.weight.detach(), 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:  # a single row
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _packable_head(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return (type(head) is nn.Linear and head.weight.dtype == torch.float32 and head.weight.device.type == "cpu"
            and torch.backends.mkldnn.is_available())


def _packed(head: nn.Linear) -> nn.Module:
    try:
        return PackedHead(head)
    except (AttributeError, RuntimeError):  # torch's private oneDNN ops may be absent from a build
        return head  # which computes the same logits


def _copy_modules(module: nn.Module, copies: dict[int, nn.Module]) -> nn.Module:
    """`module` with every submodule copied, their tables of parameters, buffers, children and hooks too, and every
    tensor shared; a module reached twice is copied once. A decode step built for the original is left behind."""
    if id(module) in copies:
        return copies[id(module)]
    clone = type(module).__new__(type(module))
    copies[id(module)] = clone
    clone.__dict__.update((name, value.copy() if isinstance(value, (dict, set)) else value)
                          for name, value in module.__dict__.items() if name != "_decode_step")
    for name, child in module._modules.items():
        clone._modules[name] = None if child is None else _copy_modules(child, copies)
    return clone


def batched_decode_layout(model: nn.Module) -> nn.Module:
    """The model laid out for decode steps of several rows: on a CPU, a copy whose Linear weights are stored
    column-major and whose float32 output head multiplies rows through oneDNN (`PackedHead`); elsewhere, or where
    nothing would change, the model itself. The copy shares every tensor it does not lay out anew, and the model
    passed in is left as it was (its parameters, their strides, its head), so its owner may go on using it.

    Why column-major: a decode step multiplies a few rows by each weight, and on a CPU x @ Wᵀ with W row-major
    takes the BLAS transposed-operand path, slower for 2-16 rows than with Wᵀ contiguous (and no different for one
    row or for long prompts; RESULTS.md, "Figures behind choices in the code"). A tied input embedding follows the
    head's weight: looking rows up in a column-major table costs nothing that matters."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.is_contiguous()
               and m.weight.device.type == "cpu"]
    if not linears and not _packable_head(model):
        return model
    model = _copy_modules(model, {})
    head_weight = getattr(getattr(model, "lm_head", None), "weight", None)  # a quantised head has none
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.is_contiguous() and module.weight.device.type == "cpu":
            weight = module.weight
            if id(weight) not in converted:
                converted[id(weight)] = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)
            module.weight = converted[id(weight)]
    embedding = getattr(model, "token_embedding", None)
    if embedding is not None and head_weight is not None and embedding.weight is head_weight:
        embedding.weight = model.lm_head.weight
    if _packable_head(model):
        model.lm_head = _packed(model.lm_head)
    return model
