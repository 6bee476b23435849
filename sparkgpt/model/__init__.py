"""The Transformer: attention, layers and the models built from them."""

from sparkgpt.model.attention import KVCache
from sparkgpt.model.transformer import GPT, Block, Encoder, EncoderDecoder, build_model, model_class

__all__ = ["GPT", "Block", "Encoder", "EncoderDecoder", "KVCache", "build_model", "model_class"]
