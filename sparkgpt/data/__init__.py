"""Data for training: raw text -> token files (`prepare`), the built-in corpora, and memmapped token data."""

from sparkgpt.data.prepare import PrepareResult, prepare
from sparkgpt.data.tokens import TokenData

__all__ = ["PrepareResult", "TokenData", "prepare"]
