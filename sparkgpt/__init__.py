"""sparkgpt: a complete, hackable GPT system on PyTorch."""

from typing import Any

from sparkgpt.config import PRESETS, ModelConfig, preset
from sparkgpt.errors import SparkGPTError
from sparkgpt.generate import Completion, SamplingParams
from sparkgpt.lm import LM, load
from sparkgpt.model import GPT
from sparkgpt.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT", "LM", "PRESETS", "Completion", "ModelConfig", "SamplingParams", "SparkGPTError", "Tokenizer", "finetune",
    "load", "preset",
]


def __getattr__(name: str) -> Any:
    """`sparkgpt.finetune`, imported on first use: using a model (generating, serving) never loads the trainer."""
    if name == "finetune":
        from sparkgpt.train.run import finetune

        return finetune
    raise AttributeError(f"module 'sparkgpt' has no attribute {name!r}")
