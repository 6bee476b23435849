"""The optimizers and the learning-rate schedule.

AdamW decouples weight decay from the gradient step: θ ← θ - lr·(m̂/(√v̂ + ε) + λ·θ). Decay pulls weight matrices
toward zero; it is not applied to norm gains, biases or embeddings (shrinking those only hurts), as usual.

Muon (Keller Jordan, 2024; `optimizer: muon`) updates the hidden weight matrices (the 2-D weights inside the
Transformer blocks) with the orthogonalised momentum: m ← β·m + (1-β)·g, u = (1-β)·g + β·m (Nesterov),
O ≈ U·Vᵀ of u = U·Σ·Vᵀ (five Newton–Schulz iterations, no SVD), θ ← θ·(1 - lr·λ) - lr·√max(1, rows/cols)·O.
Every direction of the update moves the same amount, so rare directions learn as fast as the dominant one. The
embeddings, the output head, norms and biases are no such matrices: AdamW updates them, in the same optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam

from sparkgpt.train.config import TrainConfig
from sparkgpt.train.parallel import blocks

# The quintic Newton–Schulz coefficients of Muon: they push every singular value of X/‖X‖ into about [0.7, 1.2]
# in five steps, which trains as well as exact orthogonalisation at a fraction of an SVD's cost.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight matrices of linear layers (decayed), and everything else (norms, biases, embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, param in model.named_parameters():  # shared (tied) parameters are listed once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights of the Transformer blocks: what Muon updates (not embeddings, head, norms)."""
    return [p for block in blocks(model) for p in block.parameters() if p.requires_grad and p.dim() == 2]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    device_type = next(model.parameters()).device.type
    # The fused kernel does the whole update in one pass per tensor; available on CPU and CUDA in torch ≥ 2.4.
    fused = config.fused and device_type in ("cpu", "cuda")
    if config.optimizer == "muon":
        hidden = {id(p) for p in hidden_matrices(model)}
        groups = [{"params": [p for p in group["params"] if id(p) not in hidden], "weight_decay": group["weight_decay"]}
                  for group in parameter_groups(model, config.weight_decay)]
        groups.append({"params": [p for p in model.parameters() if id(p) in hidden], "muon": True,
                       "weight_decay": config.weight_decay, "lr_scale": config.muon_lr / config.lr})
        return Muon(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                    momentum=config.muon_momentum)
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2),
        eps=config.eps, fused=fused or None, foreach=None if fused else False,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr on every group; a Muon group runs at its own multiple of it (muon_lr / lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def orthogonalise(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """≈ U·Vᵀ for update = U·Σ·Vᵀ (each matrix of a stack [..., rows, cols]): quintic Newton–Schulz iterations
    X ← aX + (bA + cA²)X, A = XXᵀ, in bf16 by default (the iteration tolerates its rounding; bf16 matmuls are the
    fast ones on AMX CPUs and GPUs)."""
    x = update.to(dtype).reshape(-1, *update.shape[-2:])
    wide = x.size(-2) <= x.size(-1)
    x = x if wide else x.mT  # iterate on the side whose Gram matrix XXᵀ is the smaller one
    # The Frobenius norm bounds the spectral norm: every singular value starts ≤ 1.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = _NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        # baddbmm(M, P, Q, beta, alpha) = beta·M + alpha·P@Q in one kernel: bA + cA², then aX + (…)X.
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.mT).reshape(update.shape)


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked `muon: True`, AdamW (decoupled decay) on the others; one state_dict for both.

    A Muon group's `lr` is set by `set_learning_rate` to the schedule's lr × its `lr_scale`."""

    def __init__(self, params: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, momentum: float = 0.95, ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, ns_steps=ns_steps,
                        muon=False, lr_scale=1.0)
        super().__init__(params, defaults)
        for group in self.param_groups:
            group["lr"] = lr * group["lr_scale"]

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(params, group)
            elif params:
                self._adamw_step(params, group)

    def _muon_step(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for param in params:
            state = self.state[param]
            if not state:
                state["momentum"] = torch.zeros_like(param)
            momentum, beta = state["momentum"], group["momentum"]
            momentum.lerp_(param.grad, 1 - beta)
            by_shape.setdefault(param.shape, []).append((param, param.grad.lerp(momentum, beta)))
        for shape, pairs in by_shape.items():  # one batched iteration per shape (q, k, v, o of every layer...)
            updates = orthogonalise(torch.stack([update for _, update in pairs]), group["ns_steps"])
            # An orthogonal matrix's entries shrink as it grows taller: rescale so every shape moves the same RMS.
            scale = math.sqrt(max(1.0, shape[0] / shape[1]))
            for (param, _), update in zip(pairs, updates, strict=True):
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"] * scale)

    def _adamw_step(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        for param in params:
            if not self.state[param]:  # the state torch.optim.AdamW keeps, so the two read alike
                self.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                         exp_avg_sq=torch.zeros_like(param))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
             [], [s["step"] for s in states], foreach=False, decoupled_weight_decay=True, amsgrad=False,
             beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=False)


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
