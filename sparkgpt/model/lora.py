"""LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank updates of chosen linear layers.

A targeted layer y = W x becomes y = W x + (α / r) · B A x, with A [r, in] and B [out, r]; only A and B train.
B starts at zero, so at initialisation the adapted model computes exactly what the base model does. Merging
writes W' = W + (α / r) · B A back into a plain linear layer: the same outputs, no extra cost at inference.

Adapters are saved and loaded in PEFT's format by `sparkgpt.checkpoint.adapter`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sparkgpt.errors import SparkGPTError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS   # leaf module names (q_proj, up_proj, ...)
    trained_modules: tuple[str, ...] = field(default=())  # trained in full and saved with the adapter (a head)

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SparkGPTError(f"config key 'lora_rank' is {self.rank!r}; expected a positive integer")
        if not self.alpha > 0:
            raise SparkGPTError(f"config key 'lora_alpha' is {self.alpha!r}; expected a positive number")
        if not 0 <= self.dropout < 1:
            raise SparkGPTError(f"config key 'lora_dropout' is {self.dropout!r}; expected a number in [0, 1)")
        if not self.targets:
            raise SparkGPTError("config key 'lora_targets' is empty; expected module names such as q_proj,v_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer `base` plus the trainable low-rank update (α / r) · B A."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init for A
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True  # off inside `adapters_disabled`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_dtype = self.base.weight.dtype
        y = self.base(x if x.dtype == base_dtype or torch.is_autocast_enabled() else x.to(base_dtype))
        if not self.enabled:
            return y
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)  # the base's dtype flows on (bf16 keys meet bf16 queries)

    def merged(self) -> nn.Linear:
        """A plain linear layer computing base + update (in the base weight's dtype)."""
        weight = self.base.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            merged.weight.copy_((weight.float() + delta).to(weight.dtype))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter, wrap each linear layer whose leaf name is a target, unfreeze `trained_modules`.
    Returns the wrapped module names; an unknown target is an error naming the layers there are."""
    config.validate()
    for param in model.parameters():
        param.requires_grad_(False)
    # The output head is never adapted (a vocabulary-sized update; a classifier does not even use it).
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.rpartition(".")[2] != "lm_head"}
    wrapped = [name for name in layers if name.rpartition(".")[2] in config.targets]
    missing = [t for t in config.targets if t not in {name.rpartition(".")[2] for name in wrapped}]
    if missing:
        known = sorted({name.rpartition(".")[2] for name in layers})
        raise SparkGPTError(f"config key 'lora_targets': no linear layer named {', '.join(missing)} in this model "
                            f"(its linear layers: {', '.join(known)})")
    for name in wrapped:
        _set_module(model, name, LoRALinear(layers[name], config.rank, config.alpha, config.dropout))
    for name in config.trained_modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SparkGPTError(f"adapter module to train in full {name!r} is not in this model") from None
        for param in module.parameters():
            param.requires_grad_(True)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged linear layer, in place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_module(model, name, module.merged())
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes what its base does (every LoRALinear skips its update): the frozen
    reference of preference tuning without a second copy of the weights."""
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoRALinear) for module in model.modules())
