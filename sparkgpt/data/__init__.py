"""Data for training: raw text -> token files (`prepare`), the built-in corpora, and memmapped token data."""

from sparkgpt.data.datasets import TokenData
from sparkgpt.data.prepare import PrepareResult, prepare

__all__ = ["PrepareResult", "TokenData", "prepare"]
