"""PyTorch distributed checkpoints (DCP), the weights of an FSDP run's checkpoint: reading them into one model
here, whatever the saving world size (DCP records each tensor's global shape and which part each file holds).
Writing them, with the optimizer state, is the trainer's (`sparkgpt.train.sharded`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from sparkgpt.checkpoint import hf
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import build_model
from sparkgpt.model.memory import allocate

MODEL_DIR = "model"


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / MODEL_DIR / ".metadata").is_file()


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """The whole model of a sharded checkpoint, in this one process (`sparkgpt convert`, `sparkgpt.load`)."""
    config, _ = hf.read_config(path)
    with torch.device("meta"):
        model = build_model(config)
    allocate(model, "cpu")
    state = get_model_state_dict(model)
    read_into(state, path / MODEL_DIR)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def read_into(state: dict[str, Any], directory: Path) -> None:
    try:
        with one_process_is_fine():
            dcp.load(state, checkpoint_id=directory)
    except Exception as error:  # DCP wraps every rank's failure in its own exception types
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise SparkGPTError(f"{directory}: not a readable sharded checkpoint ({reason})") from None


@contextlib.contextmanager
def one_process_is_fine() -> Iterator[None]:
    """DCP warns when no process group exists; for a run of one process (or an export) that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield
