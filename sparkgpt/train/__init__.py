"""Training: TrainConfig (presets, YAML, overrides), the optimizer and schedule, the training loop, fine-tuning
and distillation (`run.py`: what users call; `trainer.py`: the loop)."""

from sparkgpt.train.config import TRAIN_PRESETS, TrainConfig, load_train_config
from sparkgpt.train.run import distill, finetune, train
from sparkgpt.train.trainer import TrainingDiverged, TrainResult

__all__ = ["TRAIN_PRESETS", "TrainConfig", "TrainResult", "TrainingDiverged", "distill", "finetune",
           "load_train_config", "train"]
