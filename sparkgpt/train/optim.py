"""The optimizer and the learning-rate schedule.

AdamW decouples weight decay from the gradient step: θ ← θ - lr·(m̂/(√v̂ + ε) + λ·θ). Decay pulls weight matrices
toward zero; it is not applied to norm gains, biases or embeddings (shrinking those only hurts), as usual.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparkgpt.train.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight matrices of linear layers (decayed), and everything else (norms, biases, embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, param in model.named_parameters():  # shared (tied) parameters are listed once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    device_type = next(model.parameters()).device.type
    # The fused kernel does the whole update in one pass per tensor; available on CPU and CUDA in torch ≥ 2.4.
    fused = config.fused and device_type in ("cpu", "cuda")
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2),
        eps=config.eps, fused=fused or None, foreach=None if fused else False,
    )


def learning_rate(step: int, config: TrainConfig) -> float:
    """The lr of optimizer step `step` (0-based): linear warmup, then cosine / stable-then-decay / constant."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)  # never exactly 0: step 0 already learns
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "wsd":
        decay_start = config.max_steps - round(config.decay_fraction * config.max_steps)
        if step < decay_start:
            return config.lr
        progress = (step - decay_start) / max(1, config.max_steps - decay_start)
        return config.lr + (config.min_lr - config.lr) * progress
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - config.min_lr)
