"""Sharded checkpoints of FSDP runs, through torch.distributed.checkpoint (DCP).

RUN/checkpoints/step-0000500/
    config.json, tokenizer.json, tokenizer_config.json      what the model is (its weights are below)
    model/              DCP: .metadata, and one __R_0.distcp per rank holding that rank's shards
    trainer_state/      optimizer/ (DCP: AdamW's sharded state), rng.pt, config.yaml, state.json

Every rank writes its own shards into one staging folder beside the final name; after a barrier rank 0 writes
the rest and, last of all, trainer_state/state.json, the completion marker; then it renames the folder into
place. A save killed at any point leaves a hidden staging folder (swept on resume) or, at worst, a folder
without state.json: `checkpoints.list_checkpoints` ignores both, so the previous checkpoint is the one resumed.

DCP records each tensor's global shape and which part each file holds, and the optimizer state is keyed by
parameter name (torch.distributed.checkpoint.state_dict), so a checkpoint loads into any number of processes
(2 → 1, 1 → 2) or into a plain model: each rank reads the pieces its shards cover. The data position needs no
state: batches are a pure function of (seed, step), split by rank (sparkgpt/data/tokens.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

import sparkgpt.train.checkpoints as checkpoints
from sparkgpt.checkpoint import dcp as dcp_files
from sparkgpt.checkpoint import hf
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_directory, write_json
from sparkgpt.tokenizer import Tokenizer
from sparkgpt.train.config import TrainConfig
from sparkgpt.train.distributed import Distributed

OPTIMIZER_DIR = "optimizer"


def save_checkpoint(
    run_dir: Path, model: nn.Module, tokenizer: Tokenizer | None, optimizer: torch.optim.Optimizer,
    config: TrainConfig, state: dict[str, Any], dist: Distributed,
) -> Path:
    """Every rank: write checkpoints/step-N as described above. Refuses weights that are not finite."""
    local_finite = all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters())
    if dist.any(not local_finite, _local(next(model.parameters())).device):
        raise SparkGPTError(f"a parameter is not finite at step {state['step']}; refusing to save it")
    out = run_dir / checkpoints.CHECKPOINTS_DIR / checkpoints.checkpoint_name(state["step"])
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with atomic_directory(out) if dist.is_main else contextlib.nullcontext() as staging:
        staging = Path(dist.broadcast(str(staging) if dist.is_main else ""))  # rank 0 chose its name
        with dcp_files.one_process_is_fine():
            dcp.save(model_state, checkpoint_id=staging / dcp_files.MODEL_DIR)
            dcp.save(optimizer_state, checkpoint_id=staging / checkpoints.TRAINER_STATE_DIR / OPTIMIZER_DIR)
        dist.barrier()  # every rank's shards are on disk (DCP fsyncs each file)
        if dist.is_main:
            write_json(staging / hf.CONFIG_FILE, hf.config_to_hf(model.config, torch.float32))
            if tokenizer is not None:
                tokenizer.save(staging)
            checkpoints.write_run_state(staging / checkpoints.TRAINER_STATE_DIR, config, state)  # the marker
    dist.barrier()  # rank 0 has renamed it into place
    return out


def restore_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: read its shards of the weights and the optimizer state (any saving world size) and the RNG
    states; return state.json."""
    saved, _ = hf.read_config(path)
    checkpoints.check_same_model(path, saved, model.config)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp_files.read_into(model_state, path / dcp_files.MODEL_DIR)
    dcp_files.read_into(optimizer_state, path / checkpoints.TRAINER_STATE_DIR / OPTIMIZER_DIR)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    return checkpoints.read_run_state(path / checkpoints.TRAINER_STATE_DIR)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
