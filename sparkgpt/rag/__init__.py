"""Knowledge for an LM: search indexes over documents (`index.py`, read by `documents.py`) and knowledge graphs
(`graph.py`). Answers grounded in them are `sparkgpt.tasks.answer(lm, question, index=... | graph=...)`."""

from sparkgpt.rag.documents import Chunk, Document
from sparkgpt.rag.index import DEFAULT_EMBEDDER, BuildReport, Embedder, Hit, Index

__all__ = ["DEFAULT_EMBEDDER", "BuildReport", "Chunk", "Document", "Embedder", "Hit", "Index"]
