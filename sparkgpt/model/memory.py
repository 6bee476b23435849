"""Memory for a model built on the meta device (its shapes only): what loading and sharding fill in place."""

from __future__ import annotations

import torch
from torch import nn


def allocate(model: nn.Module, device: torch.device | str) -> None:
    """Give a meta-device model uninitialised memory on `device`, as `to_empty`, keeping tied weights tied
    (to_empty gives a plain module a new Parameter per module, which would untie a shared embedding and head)."""
    first_owner: dict[int, tuple[nn.Module, str]] = {}
    ties = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in first_owner:
                ties.append((module, name, *first_owner[id(param)]))
            else:
                first_owner[id(param)] = (module, name)
    model.to_empty(device=device)
    for module, name, owner, owner_name in ties:
        setattr(module, name, getattr(owner, owner_name))
