"""Data parallelism under torchrun: process group, device per rank, DDP wrapping and the few collectives we need.

The model knows nothing of this: DistributedDataParallel wraps it here (FSDP2 sharding is in parallel.py), and a
single process (no torchrun) gets a Distributed of world size 1 whose collectives are no-ops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparkgpt.errors import SparkGPTError


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend)
        return cls(rank=rank, local_rank=local_rank, world_size=world_size)

    def device(self, requested: str) -> torch.device:
        """The device this process trains on: each rank its own GPU; "auto" picks CUDA when present."""
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(requested)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SparkGPTError(f"device {requested!r}: CUDA is not available on this machine")
            if device.index is None:
                device = torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.enabled:
            return model
        # Gradients as views into DDP's all-reduce buckets: one copy of them, not two.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Accumulating micro-batches skip DDP's all-reduce; only the last one of a step synchronises."""
        if self.enabled and not sync and isinstance(model, DistributedDataParallel):
            with model.no_sync():
                yield
        else:
            yield

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum(tensor) / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on any (so all ranks stop together)."""
        return bool(self.sum(torch.tensor([float(flag)], device=device)).item() > 0)

    def broadcast(self, text: str) -> str:
        """Rank 0's `text` on every rank."""
        if not self.enabled:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
