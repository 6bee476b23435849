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
state: batches are a pure function of (seed, step), split by rank (sparkgpt/data/datasets.py).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from sparkgpt.checkpoint import hf
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_directory, write_json
from sparkgpt.model import build_model
from sparkgpt.tokenizer import Tokenizer
from sparkgpt.train import checkpoints
from sparkgpt.train.config import TrainConfig
from sparkgpt.train.distributed import Distributed
from sparkgpt.train.parallel import allocate

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"


def is_sharded(path: Path) -> bool:
    return (Path(path) / MODEL_DIR / ".metadata").is_file()


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
        with _one_process_is_fine():
            dcp.save(model_state, checkpoint_id=staging / MODEL_DIR)
            dcp.save(optimizer_state, checkpoint_id=staging / checkpoints.TRAINER_STATE_DIR / OPTIMIZER_DIR)
        dist.barrier()  # every rank's shards are on disk (DCP fsyncs each file)
        if dist.is_main:
            write_json(staging / hf.CONFIG_FILE, hf.config_to_hf(model.config, torch.float32))
            if tokenizer is not None:
                tokenizer.save(staging)
            checkpoints.write_run_state(staging / checkpoints.TRAINER_STATE_DIR, config, state)  # the marker
    dist.barrier()  # rank 0 has renamed it into place
    return out


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: read its shards of the weights and the optimizer state (any saving world size) and the RNG
    states; return state.json."""
    saved, _ = hf.read_config(path)
    checkpoints.check_same_model(path, saved, model.config)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    _read(model_state, path / MODEL_DIR)
    _read(optimizer_state, path / checkpoints.TRAINER_STATE_DIR / OPTIMIZER_DIR)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    return checkpoints.read_run_state(path / checkpoints.TRAINER_STATE_DIR)


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """The whole model of a sharded checkpoint, in this one process (for `sparkgpt convert` and sparkgpt.load)."""
    config, _ = hf.read_config(path)
    with torch.device("meta"):
        model = build_model(config)
    allocate(model, "cpu")
    state = get_model_state_dict(model)
    _read(state, path / MODEL_DIR)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def _read(state: dict[str, Any], directory: Path) -> None:
    try:
        with _one_process_is_fine():
            dcp.load(state, checkpoint_id=directory)
    except Exception as error:  # DCP wraps every rank's failure in its own exception types
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise SparkGPTError(f"{directory}: not a readable sharded checkpoint ({reason})") from None


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns when no process group exists; for a run of one process (or an export) that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
