"""Normalisation and feed-forward layers: the per-token parts of a Transformer block."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sparkgpt.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x²) + eps) · g, computed in fp32 so bf16 activations keep their scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normalised = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normalised.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm(x) = (x - mean) / std · g + b for GPT-2; RMSNorm for Llama."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class GeluFFN(nn.Module):
    """FFN(x) = GELU(x W_1 + b_1) W_2 + b_2, GELU in GPT-2's tanh approximation."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class SwiGLUFFN(nn.Module):
    """FFN(x) = (SiLU(x W_gate) ⊙ x W_up) W_down, the gated feed-forward of Llama."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


FFN_VARIANTS: dict[str, type[nn.Module]] = {"gelu": GeluFFN, "swiglu": SwiGLUFFN}


def make_ffn(config: ModelConfig) -> nn.Module:
    return FFN_VARIANTS[config.ffn](config)
