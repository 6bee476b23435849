"""Parallelism applied to a plain model in one fixed order: activation checkpointing, then torch.compile, then
DDP or FSDP2, each per Transformer block (torchtitan's parallelize.py). The model code knows nothing of it.

FSDP2 (`fully_shard`) leaves each rank 1/N of every parameter, gradient and AdamW state, as DTensors sharded on
dim 0. A block's whole weights exist only while it runs: all-gathered before its forward and its backward,
freed after; its gradients are reduce-scattered (averaged) in fp32. With a bf16 or fp16 training dtype the
blocks compute in that dtype (MixedPrecisionPolicy) while the fp32 shards stay the optimizer's master weights.

Under FSDP the model is built on the meta device, sharded while it has no storage, and only then given memory
(`to_empty`): no process ever holds the whole model. `initialise` then fills every shard with exactly the values
the model's constructor would give it with the same seed on one process.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from sparkgpt import hardware
from sparkgpt.config import ModelConfig
from sparkgpt.model import build_model, native
from sparkgpt.model.memory import allocate
from sparkgpt.train.config import TrainConfig
from sparkgpt.train.distributed import Distributed

_COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def is_sharded(config: TrainConfig, dist: Distributed) -> bool:
    """FSDP shards only across several processes; one process trains the plain model (nothing to shard)."""
    return config.parallel == "fsdp" and dist.enabled


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated Transformer blocks, the unit of checkpointing, compilation and sharding."""
    decoder = getattr(model, "backbone", model)  # a classifier's decoder
    return [*getattr(decoder, "encoder_blocks", ()), *decoder.blocks]


def new_model(model_config: ModelConfig, config: TrainConfig, dist: Distributed, device: torch.device) -> nn.Module:
    """A model to train from scratch: built whole on `device` (from the generator's current state), or, when it
    will be sharded, on the meta device without memory: `parallelize` gives it its shards and initialises them."""
    if is_sharded(config, dist):
        with torch.device("meta"):
            return build_model(model_config).train()
    return build_model(model_config).to(device).train()


def parallelize(model: nn.Module, config: TrainConfig, dist: Distributed, device: torch.device) -> nn.Module:
    """Activation checkpointing, torch.compile, then FSDP2 or DDP, block by block; returns the module to call
    (the model itself, or its DDP wrapper). A meta-device model is then allocated and initialised from the seed."""
    if config.activation_checkpointing:
        for block in blocks(model):
            checkpoint(block)  # keep only the block's input; recompute its insides during the backward
    if config.compile and device.type == "cpu" and hardware.cxx_compiler() is None:
        # Inductor writes C++ for the CPU: without a compiler the first step would fail, so train uncompiled.
        warnings.warn("sparkgpt: compile is on but no C++ compiler was found (install g++ or clang); training "
                      "without torch.compile", stacklevel=2)
        hardware.note("torch.compile", "off", "no C++ compiler on this machine (Inductor needs one on the CPU)")
    elif config.compile:
        if device.type == "cpu":
            native.load()  # its kernels' library ready before tracing, which then reads it without a graph break
        for block in blocks(model):
            block.compile()
    if not is_sharded(config, dist):
        return dist.wrap(model, device)
    mesh = init_device_mesh(device.type, (dist.world_size,))
    compute = _COMPUTE_DTYPES.get(config.dtype)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # embeddings, final norm and head: one group at the root
    if next(model.parameters()).is_meta:
        allocate(model, device)
        initialise(model, config.seed)
    return model


def casts_weights(model: nn.Module) -> bool:
    """FSDP2's mixed precision computes with weights cast to the training dtype: autocast would only add casts."""
    return isinstance(model, FSDPModule)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a gradient norm under FSDP is one); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def initialise(model: nn.Module, seed: int) -> None:
    """Fill every parameter as `torch.manual_seed(seed); build_model(config)` would: the constructor's random
    draws replayed in the order it makes them (each module's `reset_parameters`, in registration order, which is
    construction order), then the model's own `init_weights`. A sharded parameter draws its whole tensor, one at a
    time, and keeps its shard, so the values (and the generator's state after) do not depend on the sharding."""
    torch.manual_seed(seed)
    with torch.no_grad(), _WholeTensorDraws():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        model.init_weights()


class _WholeTensorDraws(TorchDispatchMode):
    """Random fills of a DTensor draw the whole tensor on this rank and keep the local shard.

    DTensor's own random ops on CPU fill each shard from the local generator, so every rank would get the first
    shard's values; CUDA's offset-based tracker gets other values than one process's generator. Drawing whole
    keeps one process's stream exactly, at the cost of one parameter's memory at a time."""

    _RANDOM_FILLS = (torch.ops.aten.uniform_.default, torch.ops.aten.normal_.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        if func in self._RANDOM_FILLS and isinstance(target, DTensor):
            whole = torch.empty(target.shape, dtype=target.dtype, device=target.to_local().device)
            func(whole, *args[1:], **kwargs)
            shard = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(shard.to_local())
            return target
        return func(*args, **kwargs)
