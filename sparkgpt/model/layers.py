"""Normalisation and feed-forward layers: the per-token parts of a Transformer block."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

import sparkgpt.model.native as native
from sparkgpt.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x²) + eps) · g, computed in fp32 so bf16 activations keep their scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (fused := native.inference_ops(x)) is not None and self.weight.dtype == x.dtype:
            return fused.rms_norm(x.contiguous(), self.weight, self.eps)  # the lines below in one pass
        x32 = x.float()
        normalised = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normalised.to(x.dtype)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap): about x while |x| ≪ cap, never past ±cap (Gemma 2's attention scores and logits)."""
    return torch.tanh(x / cap) * cap


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm(x) = (x - mean) / std · g + b for GPT-2; RMSNorm for Llama."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class GeluFFN(nn.Module):
    """FFN(x) = act(x W_1 + b_1) W_2 + b_2: GELU in GPT-2's tanh approximation ("gelu"), exact GELU ("gelu_exact":
    BERT), ReLU ("relu": the 2017 paper, torch.nn.Transformer), or x · σ(1.702 x) ("quick_gelu": CLIP)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.activation = _ACTIVATIONS[config.ffn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.up_proj(x)))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · σ(1.702 x): the sigmoid approximation of GELU OpenAI trained CLIP with, so its checkpoints need it."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"gelu": partial(F.gelu, approximate="tanh"), "gelu_exact": F.gelu, "relu": F.relu,
                "quick_gelu": quick_gelu}


class SwiGLUFFN(nn.Module):
    """FFN(x) = (SiLU(x W_gate) ⊙ x W_up) W_down, the gated feed-forward of Llama."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if (fused := native.inference_ops(gate)) is not None and up.dtype == gate.dtype:
            return self.down_proj(fused.silu_mul(gate.contiguous(), up.contiguous()))  # one pass, same rounding
        return self.down_proj(F.silu(gate) * up)


class GeGLUFFN(SwiGLUFFN):
    """FFN(x) = (GELU(x W_gate) ⊙ x W_up) W_down, GELU in its tanh approximation (Shazeer 2020; Gemma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


FFN_VARIANTS: dict[str, type[nn.Module]] = {"gelu": GeluFFN, "gelu_exact": GeluFFN, "relu": GeluFFN,
                                            "quick_gelu": GeluFFN,
                                            "swiglu": SwiGLUFFN, "geglu": GeGLUFFN}


class MixtureOfExperts(nn.Module):
    """MoE(x) = Σ_{e ∈ top-k(p)} (p_e / Σ_{top-k} p) · FFN_e(x), with router probabilities p = softmax(x W_r).

    Each token goes to its k most probable experts (Mixtral: k = 2 of 8) and their outputs are mixed with the
    renormalised router weights, so a layer holds E FFNs but each token pays for k. The router's statistics of the
    last forward (`router_stats`: per-expert token counts and summed probabilities) feed the load-balancing loss
    the model reports (`GPT.aux_loss`).

    Capacity: with `expert_capacity_factor` None every routed token is computed (dropless, as Mixtral). With a
    factor f, expert e computes at most ⌈f · N · k / E⌉ of the N tokens of the batch, first come first served in
    token order; a token's overflowing assignment contributes nothing (its other experts, and the residual
    stream, still carry it), as in GShard and the Switch Transformer.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.capacity_factor = config.experts_per_token, config.expert_capacity_factor
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(FFN_VARIANTS[config.ffn](config) for _ in range(config.n_experts))
        self.router_stats: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities [N, E] (fp32), and each token's k experts [N, k] with their weights [N, k]."""
        probs = torch.softmax(self.router(tokens).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return probs, experts, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        probs, chosen, weights = self.route(tokens)
        counts = torch.zeros(len(self.experts), device=x.device).index_add_(
            0, chosen.flatten(), torch.ones(chosen.numel(), device=x.device))
        self.router_stats = (counts, probs.sum(dim=0), tokens.shape[0])
        capacity = None
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * tokens.shape[0] * self.top_k / len(self.experts))
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            rows, slots = torch.where(chosen == index)
            if capacity is not None:
                rows, slots = rows[:capacity], slots[:capacity]
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slots, None].to(tokens.dtype))
        return out.view(x.shape)


def make_ffn(config: ModelConfig) -> nn.Module:
    if config.n_experts:
        return MixtureOfExperts(config)
    return FFN_VARIANTS[config.ffn](config)
