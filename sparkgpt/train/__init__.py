"""Pretraining: TrainConfig (presets, YAML, overrides), the optimizer and schedule, and the training loop."""

from sparkgpt.train.config import TRAIN_PRESETS, TrainConfig, load_train_config
from sparkgpt.train.trainer import TrainingDiverged, TrainResult, train

__all__ = ["TRAIN_PRESETS", "TrainConfig", "TrainResult", "TrainingDiverged", "load_train_config", "train"]
