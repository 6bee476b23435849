"""Training checkpoints: an HF-compatible model directory with the trainer's state inside, written atomically.

RUN/checkpoints/step-0000500/
    config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json
    trainer_state/  state.json (step, val loss, RNG of python and numpy), optimizer.pt, rng.pt (torch RNGs),
                    config.yaml (the resolved TrainConfig)

The whole folder is staged beside its final name, fsynced and renamed in one step (sparkgpt.files.atomic_directory):
a save killed halfway leaves a hidden `.step-*.tmp-*` folder that is never read and is swept on resume, and the
previous checkpoints intact. Weights are read back with safetensors; torch.load (weights_only) reads only our
own optimizer and RNG tensors.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparkgpt.checkpoint import adapter, hf, load, vision
from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_directory, read_json_object, write_json
from sparkgpt.model.lora import has_lora
from sparkgpt.tokenizer import Tokenizer
from sparkgpt.train.config import TrainConfig, save_train_config

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_DIR = "trainer_state"
STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    val_loss: float | None


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first (staging folders are hidden and never match)."""
    found = []
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        state_path = path / TRAINER_STATE_DIR / STATE_FILE
        if match and state_path.is_file():
            state = read_json_object(state_path)
            found.append(CheckpointInfo(path, int(match.group(1)), state.get("val_loss")))
    return sorted(found, key=lambda c: c.step)


def sweep_partial_saves(run_dir: Path) -> None:
    """Remove staging folders that a killed save left behind."""
    folder = run_dir / CHECKPOINTS_DIR
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(".step-") and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able python/numpy RNG states, torch RNG tensors)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    plain = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *[v.item() if hasattr(v, "item") else v
                                                             for v in numpy_state[2:]]],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda:{index}"] = state
    return plain, tensors


def restore_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[f"cuda:{i}"] for i in range(torch.cuda.device_count()) if f"cuda:{i}" in tensors]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)


def write_trainer_state(
    directory: Path, optimizer: torch.optim.Optimizer, config: TrainConfig, state: dict[str, Any]
) -> None:
    directory.mkdir()
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    write_run_state(directory, config, state)


def write_run_state(directory: Path, config: TrainConfig, state: dict[str, Any]) -> None:
    """RNG states, the config, and last state.json: a checkpoint without it is incomplete and never listed."""
    directory.mkdir(exist_ok=True)
    plain_rng, tensor_rng = rng_state()
    torch.save(tensor_rng, directory / "rng.pt")
    save_train_config(config, directory / "config.yaml")
    write_json(directory / STATE_FILE, {**state, "rng": plain_rng})


def save_checkpoint(
    run_dir: Path, model: nn.Module, tokenizer: Tokenizer | None, optimizer: torch.optim.Optimizer,
    config: TrainConfig, state: dict[str, Any],
) -> Path:
    """Write checkpoints/step-N atomically. Refuses weights that are not finite (they would poison a resume)."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise SparkGPTError(f"parameter {name} is not finite at step {state['step']}; refusing to save it")
    out = run_dir / CHECKPOINTS_DIR / checkpoint_name(state["step"])
    with atomic_directory(out) as staging:
        if has_lora(model):  # the adapter alone: the frozen base is `init_from`'s
            extra = {"labels": model.labels} if hasattr(model, "labels") else {}
            adapter.save_adapter(staging, model, config.lora_config(), config.init_from, config.task, extra)
        else:
            load.write_model(staging, model)
        if tokenizer is not None:
            tokenizer.save(staging)
        write_trainer_state(staging / TRAINER_STATE_DIR, optimizer, config, state)
    return out


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest validation loss (the later one of a tie), if any was scored."""
    scored = [c for c in list_checkpoints(run_dir) if c.val_loss is not None]
    return min(scored, key=lambda c: (c.val_loss, -c.step)).path if scored else None


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and the one with the lowest validation loss; delete the rest."""
    checkpoints = list_checkpoints(run_dir)
    keep = {c.path for c in checkpoints[-keep_last:]}
    if (best := best_checkpoint(run_dir)) is not None:
        keep.add(best)
    for checkpoint in checkpoints:
        if checkpoint.path not in keep:
            shutil.rmtree(checkpoint.path, ignore_errors=True)


def restore_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights (safetensors), optimizer state and RNG states into place; return state.json."""
    if adapter.is_adapter(path):
        adapter.load_adapter_weights(model, path)
    else:
        if vision.checkpoint_kind(path) is not None:  # an image-to-text model, in transformers' own layout
            (config, tensors, _), labels = vision.read_checkpoint(path), None
        else:
            config, tensors, labels, _ = hf.read_model_state(path)
        check_same_model(path, config, model.config)
        if labels is not None:  # a classifier: the decoder's tensors sit under `backbone.`
            tensors = {name if name == hf.SCORE_WEIGHT else f"backbone.{name}": t for name, t in tensors.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight", "backbone.lm_head.weight"} if config.tie_embeddings else set()
        if unexpected or set(missing) - tied:
            raise SparkGPTError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    trainer_dir = path / TRAINER_STATE_DIR
    try:
        optimizer.load_state_dict(torch.load(trainer_dir / "optimizer.pt", weights_only=True, map_location="cpu"))
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise SparkGPTError(f"{trainer_dir}: unreadable trainer state ({str(error).splitlines()[0]})") from None
    return read_run_state(trainer_dir)


def check_same_model(path: Path, saved: ModelConfig, configured: ModelConfig) -> None:
    if saved.to_dict() != {**configured.to_dict(), "attention_backend": saved.attention_backend}:
        raise SparkGPTError(f"{path / hf.CONFIG_FILE}: the checkpoint's model differs from the configured one; "
                            "resume with the run's own config")


def read_run_state(directory: Path) -> dict[str, Any]:
    """state.json, with the RNG states it and rng.pt hold restored into this process."""
    state = read_json_object(directory / STATE_FILE)
    try:
        tensor_rng = torch.load(directory / "rng.pt", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise SparkGPTError(f"{directory}: unreadable trainer state ({str(error).splitlines()[0]})") from None
    restore_rng_state(state["rng"], tensor_rng)
    return state
