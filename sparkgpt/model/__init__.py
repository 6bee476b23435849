"""The Transformer: attention, layers and the models built from them."""

from typing import Any

from torch import nn

from sparkgpt.config import PRESETS, ModelConfig, preset
from sparkgpt.model.attention import KVCache
from sparkgpt.model.transformer import GPT, Block, Encoder, EncoderDecoder, model_class
from sparkgpt.model.vision import CLIP, IMAGE_FIELDS, ImageText, ImageTextConfig, ViT


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (`sparkgpt.config.PRESETS`) with some fields changed, as its config class: an ImageTextConfig
    for a preset with an image front end, else a ModelConfig."""
    image = any(field in PRESETS.get(name, {}) for field in IMAGE_FIELDS)
    return preset(name, ImageTextConfig if image else ModelConfig, **overrides)


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialised model of a config: an image-to-text model for an ImageTextConfig, else the GPT,
    Encoder or EncoderDecoder its architecture names."""
    if isinstance(config, ImageTextConfig):
        return ImageText(config)
    return model_class(config)(config)


__all__ = ["CLIP", "GPT", "Block", "Encoder", "EncoderDecoder", "ImageText", "KVCache", "ViT", "build_model",
           "model_class", "preset_config"]
