"""What users run: `train` (from scratch or resumed), `finetune` (from a pretrained model) and `distill` (from a
teacher). Each resolves its configuration and hands it to the loop in `trainer.py` (or its distillation subclass),
as torchtitan separates `train.py` from `trainer.py`.

Fine-tuning: chat, prompt/completion or text records teach the language model (loss on what the model should
write); labeled records train a classification head. `method="lora"` freezes the model and trains adapters, saved
on their own; `method="full"` updates every weight and saves whole checkpoints. Everything else (config keys,
checkpoints, exact resume, metrics, DDP under torchrun) is the trainer's.

One run per folder: `train` (and so `finetune` and `distill`) holds an exclusive lock on RUN/.lock (flock, which
the kernel releases if the process dies) from before the trainer looks at the folder to the run's end; a second
run into the same folder is a one-line error naming it. The config and metrics snapshots are written atomically.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal

from sparkgpt.config import PRESETS
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import exclusive_lock
from sparkgpt.train.config import TRAIN_PRESETS, TrainConfig, load_train_config
from sparkgpt.train.distill import DistillTrainer
from sparkgpt.train.preference import PreferenceTrainer
from sparkgpt.train.trainer import CONFIG_FILE, Trainer, TrainResult

RUN_LOCK = ".lock"  # in the run folder: held (flock) by the run writing there, released by the kernel if it dies


def train(
    config: str | Path | TrainConfig | None = None,
    out_dir: str | Path = "runs/train",
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or with `resume`, continue) a run in `out_dir`. `config` is a preset name, a YAML file or a
    TrainConfig; `overrides` ({key: value}) apply on top. On resume without a config, the run's own config.yaml."""
    run_dir = Path(out_dir)
    if isinstance(config, TrainConfig):
        resolved = load_train_config(None, {**config.to_dict(), **(overrides or {})})
    elif config is None and resume:
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise SparkGPTError(f"{run_dir}: no {CONFIG_FILE} to resume from (not a training run folder)")
        resolved = load_train_config(saved, overrides)
    else:
        resolved = load_train_config(config, overrides)
    trainer_class = DistillTrainer if resolved.teacher else \
        PreferenceTrainer if resolved.task == "dpo" else Trainer
    # One run per folder: a second one would interleave checkpoints, metrics and config. Under torchrun the ranks
    # of one run share the folder, and rank 0 holds the lock for them all.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with exclusive_lock(run_dir / RUN_LOCK, f"{run_dir}: another training run is writing to this folder; wait for "
                        "it to end or choose another --out") if main_rank else contextlib.nullcontext():
        trainer = trainer_class(resolved, run_dir, resume=resume, progress=progress)
        try:
            return trainer.run()
        finally:
            trainer.close()


def finetune(
    ref: str | Path = "",
    data: str | Path = "",
    out_dir: str | Path = "runs/finetune",
    val: str | Path | None = None,
    method: Literal["full", "lora", "dpo"] = "lora",
    task: Literal["lm", "classify", "dpo"] = "lm",
    config: str | Path | TrainConfig | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune model `ref` on the JSONL file `data` into the run folder `out_dir`.

    `config` is a training preset or YAML file (default: finetune-lora or finetune-full by `method`, or for
    `task="dpo"` finetune-dpo-lora / finetune-dpo-full; `method="dpo"` is short for LoRA with task dpo); `overrides`
    apply on top ({"lora_rank": 16, "epochs": 5, ...}). The presets size the run to the data (`epochs: auto`) and
    the result names the last checkpoint and the one with the lowest validation loss: a LoRA adapter folder or a
    whole model, either of which `sparkgpt.load` takes (as does every command). With `resume`, continue the run in
    `out_dir` from its last checkpoint, with the run's own config (`ref`, `data` and `config` are then not needed;
    `overrides` still apply)."""
    if resume:
        return train(None, out_dir, overrides, resume=True, progress=progress)
    if method == "dpo":  # `--method dpo`: preference tuning with LoRA adapters (the base is the reference)
        method, task = "lora", "dpo"
    settings = {"init_from": str(ref), "data": str(data), "val_data": str(val or ""), "method": method, "task": task}
    preset = f"finetune-dpo-{method}" if task == "dpo" else f"finetune-{method}"
    return train(config or preset, out_dir, {**settings, **(overrides or {})}, resume, progress)


def distill(
    teacher: str | Path | None = None,
    student: str | Path | TrainConfig | None = None,
    data: str | Path | None = None,
    out_dir: str | Path = "runs/distill",
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train `student` on `teacher`'s softened distribution over the prepared folder `data`, into `out_dir`.

    `teacher` is any model reference; `student` a training preset, a YAML file or TrainConfig (its `model` is the
    student), or a model preset (the default training settings). `data` must be prepared with the teacher's
    tokenizer (`sparkgpt prepare ... --tokenizer TEACHER`). `overrides` apply on top: {"distill_temperature": 2.0,
    "distill_alpha": 0.5, "max_steps": ..., "model.n_layers": ...}. With `resume`, continue the run in `out_dir`
    from its last checkpoint and its config.yaml (which names the teacher); the other arguments are then unused."""
    if resume:
        return train(None, out_dir, overrides, resume=True, progress=progress)
    if not teacher or student is None or data is None:
        raise SparkGPTError("distillation needs a teacher, a student and data (a folder prepared with the teacher's "
                            "tokenizer)")
    config, settings = student, {"teacher": str(teacher), "data": str(data)}
    if not isinstance(student, TrainConfig):
        name = str(student)
        if name in PRESETS and name not in TRAIN_PRESETS:
            config, settings = None, {"model": name, **settings}
        elif name not in TRAIN_PRESETS and not (Path(name).is_file() or name.endswith((".yaml", ".yml"))):
            raise SparkGPTError(f"student {name!r}: not a training preset ({', '.join(TRAIN_PRESETS)}), a YAML file "
                                f"or a model preset ({', '.join(PRESETS)})")
    return train(config, out_dir, {**settings, **(overrides or {})}, progress=progress)
