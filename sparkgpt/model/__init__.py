"""The Transformer: attention, layers and the models built from them."""

from sparkgpt.model.attention import KVCache
from sparkgpt.model.transformer import GPT, Block

__all__ = ["GPT", "Block", "KVCache"]
