"""Training: TrainConfig (presets, YAML, overrides), the optimizer and schedule, the training loop, fine-tuning."""

from sparkgpt.train.config import TRAIN_PRESETS, TrainConfig, load_train_config
from sparkgpt.train.finetune import finetune
from sparkgpt.train.trainer import TrainingDiverged, TrainResult, train

__all__ = ["TRAIN_PRESETS", "TrainConfig", "TrainResult", "TrainingDiverged", "finetune", "load_train_config",
           "train"]
