"""The Transformer: attention, layers and the models built from them."""

from sparkgpt.model.attention import KVCache
from sparkgpt.model.transformer import GPT, Block, Encoder, EncoderDecoder, build_model, model_class
from sparkgpt.model.vision import CLIP, ViT

__all__ = ["CLIP", "GPT", "Block", "Encoder", "EncoderDecoder", "KVCache", "ViT", "build_model", "model_class"]
