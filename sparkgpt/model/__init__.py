"""The Transformer: attention, layers and the models built from them."""

from torch import nn

from sparkgpt.config import ImageTextConfig, ModelConfig
from sparkgpt.model.attention import KVCache
from sparkgpt.model.transformer import GPT, Block, Encoder, EncoderDecoder, model_class
from sparkgpt.model.vision import CLIP, ImageText, ViT


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialised model of a config: an image-to-text model for an ImageTextConfig, else the GPT,
    Encoder or EncoderDecoder its architecture names."""
    if isinstance(config, ImageTextConfig):
        return ImageText(config)
    return model_class(config)(config)


__all__ = ["CLIP", "GPT", "Block", "Encoder", "EncoderDecoder", "ImageText", "KVCache", "ViT", "build_model",
           "model_class"]
