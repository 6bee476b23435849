"""The memory planner: what one training process holds at its peak, from the model's shape alone.

Per rank, in bytes, for AdamW with fp32 master weights (as sparkgpt trains):

    parameters   4·P / N under FSDP (each rank its shard), 4·P otherwise
    gradients    4·P / N under FSDP; 4·P otherwise (DDP keeps them in its all-reduce buckets)
    optimizer    8·P / N under FSDP (AdamW's m and v), 8·P otherwise
    gathered     FSDP only: the root's weights (embeddings, head) whole for the step, and two blocks' weights
                 whole at once (the one computing and the next, prefetched), plus one block's fp32 gradients
                 before their reduce-scatter
    activations  what the backward needs, per sequence of T tokens: per block the norms' inputs and outputs, q, k,
                 v, the attention output and its log-sum-exp, and the FFN's hidden values (4·d_ff for SwiGLU,
                 2·d_ff for GELU); with activation checkpointing only each block's input, plus one block's worth
                 recomputed during the backward; then the loss (fp32 log-softmax over the vocabulary, its gradient
                 and the logits' gradient at the start of the backward)

The peak is the larger of (weights, optimizer state, gradients the backward has made by then, activations and
loss) and (weights, optimizer state, all gradients); activations grow linearly with the micro-batch, so the
largest micro-batch that fits follows. `measure_peak` records the real peak of a training step with PyTorch's
own memory trackers (torch.distributed._tools), which is what the estimate is checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparkgpt.config import PRESETS, ModelConfig, preset
from sparkgpt.errors import SparkGPTError
from sparkgpt.train.config import TRAIN_PRESETS, load_train_config

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank; `activations` and `loss` are per sequence of `block_size` tokens."""

    name: str
    model: ModelConfig
    world_size: int
    parallel: str
    activation_checkpointing: bool
    dtype: str
    block_size: int
    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int
    loss: int
    first_gradients: int  # made at the very start of the backward (the head's), while every activation lives

    @property
    def persistent_gradients(self) -> bool:
        """DDP's gradients live in its all-reduce buckets for the whole run; otherwise they are made during the
        backward (as activations are freed) and dropped after the optimizer step."""
        return self.parallel == "ddp" and self.world_size > 1

    @property
    def static(self) -> int:
        held = self.gradients if self.persistent_gradients else 0
        return self.parameters + self.optimizer + self.gathered + held

    def peak(self, micro_batch: int) -> int:
        during_backward = self.first_gradients + micro_batch * (self.activations + self.loss)
        return self.static + max(during_backward, 0 if self.persistent_gradients else self.gradients)

    def largest_micro_batch(self, device_bytes: float) -> int:
        """The most sequences per micro-batch whose peak fits in `device_bytes` (0: not even one)."""
        free = device_bytes - self.static - self.first_gradients
        if self.peak(0) > device_bytes or free <= 0:
            return 0
        return int(free // (self.activations + self.loss))

    def report(self, device_gib: float) -> str:
        device_bytes = device_gib * GiB
        fits = self.largest_micro_batch(device_bytes)
        mode = f"FSDP over {self.world_size} ranks" if self.parallel == "fsdp" else \
            f"DDP over {self.world_size} ranks" if self.world_size > 1 else "one process"
        checkpointing = "on" if self.activation_checkpointing else "off"
        kind = "fp32 shard" if self.parallel == "fsdp" else "fp32"
        rows = [
            (f"parameters ({kind})", self.parameters),
            (f"gradients ({kind})", self.gradients),
            ("optimizer state (AdamW m, v)", self.optimizer),
            ("gathered weights and gradients", self.gathered),
            (f"activations per sequence ({self.block_size} tokens)", self.activations),
            ("loss (logits, log-softmax, grads) per sequence", self.loss),
        ]
        lines = [f"{self.name}: {self.model.num_parameters() / 1e6:,.1f}M parameters, {mode}, {self.dtype} "
                 f"compute, activation checkpointing {checkpointing}", "per rank:"]
        lines += [f"  {label:<52}{value / GiB:>10.3f} GiB" for label, value in rows]
        if fits:
            lines.append(f"largest micro-batch in {device_gib:g} GiB: {fits} sequences "
                         f"(peak {self.peak(fits) / GiB:.2f} GiB per rank)")
        else:
            lines.append(f"does not fit in {device_gib:g} GiB per rank even at micro-batch 1 "
                         f"(needs {self.peak(1) / GiB:.2f} GiB); use more ranks, --parallel fsdp or "
                         "--activation-checkpointing")
        return "\n".join(lines)


def _block_activations(config: ModelConfig, tokens: int, compute_bytes: int) -> int:
    """Bytes one block saves for its backward over `tokens` tokens (see the module docstring)."""
    d, q_dim, kv_dim = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    norm = 3 * d if config.norm == "rmsnorm" else 2 * d  # RMSNorm: input, normalised, output; LayerNorm: in, out
    ffn = (4 if config.ffn == "swiglu" else 2) * config.d_ff
    if config.n_experts:
        ffn = ffn * config.experts_per_token + config.n_experts
    values = 2 * norm + 3 * q_dim + 2 * kv_dim + ffn  # q, attention output, its reshaped copy; k, v
    stats = 2 * 2 + config.n_heads  # per-token norm statistics and the attention's log-sum-exp, in fp32
    return tokens * (values * compute_bytes + stats * 4)


def estimate(
    model: ModelConfig, *, name: str = "model", world_size: int = 1, parallel: str = "ddp",
    activation_checkpointing: bool = False, dtype: str = "bfloat16", block_size: int | None = None,
) -> MemoryPlan:
    """The memory plan of training `model` on `world_size` processes (sequences of `block_size` tokens)."""
    tokens = block_size or model.max_seq_len
    compute = _BYTES[dtype]
    total = model.num_parameters()
    block = (total - _outside_blocks(model)) // max(model.n_layers + (model.n_encoder_layers or 0), 1)
    sharded = parallel == "fsdp" and world_size > 1
    shards = world_size if sharded else 1
    parameters, gradients, optimizer = 4 * total // shards, 4 * total // shards, 8 * total // shards
    gathered = 0
    if sharded:
        gathered = _outside_blocks(model) * compute + 2 * block * compute + 4 * block
    per_block = _block_activations(model, tokens, compute)
    layers = model.n_layers + (model.n_encoder_layers or 0)
    final_norm = tokens * (3 if model.norm == "rmsnorm" else 2) * model.d_model * compute
    if activation_checkpointing:
        activations = layers * tokens * model.d_model * compute + per_block + final_norm
    else:
        activations = layers * per_block + final_norm
    loss = 3 * tokens * model.vocab_size * 4  # log-softmax (saved), its gradient and the logits' gradient
    first = model.vocab_size * model.d_model * 4 // shards  # the head's weight gradient
    return MemoryPlan(name, model, world_size, parallel if world_size > 1 else "ddp", activation_checkpointing,
                      dtype, tokens, parameters, gradients, optimizer, gathered, activations, loss, first)


def plan_config(
    config: str, *, world_size: int = 1, parallel: str | None = None, activation_checkpointing: bool | None = None,
    dtype: str | None = None, block_size: int | None = None,
) -> MemoryPlan:
    """The plan for a model preset (sequences of its full context, bf16) or a training preset / YAML file (its
    block size, dtype, parallelism); the keyword arguments that are not None take precedence."""
    if world_size < 1:
        raise SparkGPTError(f"--world-size is {world_size}; expected a positive integer")
    if block_size is not None and block_size < 1:
        raise SparkGPTError(f"--block-size is {block_size}; expected a positive integer")
    if dtype is not None and dtype not in _BYTES:
        raise SparkGPTError(f"--dtype is {dtype!r}; expected one of {', '.join(_BYTES)}")
    if config in PRESETS and config not in TRAIN_PRESETS:
        model = preset(config)
        defaults = {"parallel": "ddp", "activation_checkpointing": False, "dtype": "bfloat16"}
        default_block = model.max_seq_len
    else:
        train = load_train_config(config)
        model, default_block = train.model_config(), train.block_size
        # "auto" is bf16 on the GPUs a plan is for (the trainer times it only on a CPU)
        defaults = {"parallel": train.parallel, "activation_checkpointing": train.activation_checkpointing,
                    "dtype": "bfloat16" if train.dtype == "auto" else train.dtype}
    chosen = {"parallel": parallel, "activation_checkpointing": activation_checkpointing, "dtype": dtype}
    chosen = {key: defaults[key] if value is None else value for key, value in chosen.items()}
    return estimate(model, name=config, world_size=world_size, block_size=block_size or default_block, **chosen)


def _outside_blocks(model: ModelConfig) -> int:
    """Parameters outside the blocks: embeddings, final norms, the head (the FSDP root group). Encoder blocks
    count as decoder blocks (an encoder–decoder's estimate is a little high)."""
    one, two = model.replace(n_layers=1).num_parameters(), model.replace(n_layers=2).num_parameters()
    return one - (two - one) * (1 + (model.n_encoder_layers or 0))


def measure_peak(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], object]) -> int:
    """The peak bytes of live tensors on this process during `step()` (one training step), recorded by PyTorch's
    MemTracker (FSDPMemTracker for an FSDP model): weights, gradients, optimizer state, activations, temporaries."""
    from torch.distributed._tools import FSDPMemTracker, MemTracker
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        tracker = FSDPMemTracker(model, optimizer)
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
    with tracker:
        step()
    device = next(model.parameters()).device
    return int(tracker.get_tracker_snapshot("peak")[device]["Total"])
