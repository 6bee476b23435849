"""sparkgpt: a complete, hackable GPT system on PyTorch."""

from sparkgpt.config import PRESETS, ModelConfig, preset
from sparkgpt.errors import SparkGPTError
from sparkgpt.generate import Completion, SamplingParams
from sparkgpt.lm import LM, load
from sparkgpt.model import GPT
from sparkgpt.tokenizer import Tokenizer
from sparkgpt.train.run import finetune

__version__ = "0.1.0"

__all__ = [
    "GPT", "LM", "PRESETS", "Completion", "ModelConfig", "SamplingParams", "SparkGPTError", "Tokenizer", "finetune",
    "load", "preset",
]
