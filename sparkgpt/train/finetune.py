"""Fine-tuning: `finetune(ref, data, ...)`, the training loop of `train` started from a pretrained model.

Chat, prompt/completion or text records teach the language model (loss on what the model should write); labeled
records train a classification head. `method="lora"` freezes the model and trains adapters, saved on their own;
`method="full"` updates every weight and saves whole checkpoints. Everything else (config keys, checkpoints, exact
resume, metrics, DDP under torchrun) is the trainer's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from sparkgpt.train.config import TrainConfig
from sparkgpt.train.trainer import TrainResult, train


def finetune(
    ref: str | Path = "",
    data: str | Path = "",
    out_dir: str | Path = "runs/finetune",
    val: str | Path | None = None,
    method: Literal["full", "lora"] = "lora",
    task: Literal["lm", "classify"] = "lm",
    config: str | Path | TrainConfig | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune model `ref` on the JSONL file `data` into the run folder `out_dir`.

    `config` is a training preset or YAML file (default: finetune-lora or finetune-full, by `method`); `overrides`
    apply on top ({"lora_rank": 16, "epochs": 5, ...}). With `resume`, continue the run in `out_dir` from its last
    checkpoint, with the run's own config (`ref`, `data` and `config` are then not needed; `overrides` still apply).
    The result names the last checkpoint: a LoRA adapter folder or a whole model, either of which `sparkgpt.load`
    takes (as does every command)."""
    if resume:
        return train(None, out_dir, overrides, resume=True, progress=progress)
    settings = {"init_from": str(ref), "data": str(data), "val_data": str(val or ""), "method": method, "task": task}
    return train(config or f"finetune-{method}", out_dir, {**settings, **(overrides or {})}, resume, progress)
