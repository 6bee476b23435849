"""Sentence vectors for /v1/embeddings: an encoder's mean-pooled embeddings (`LM.embed`'s), or a decoder's final
hidden states (what its language-model head reads) averaged over the input's tokens and L2-normalised.

A `Pooler` works on token ids, already checked against the vocabulary and the context (`protocol.py`); it runs in
a worker thread of the HTTP layer, never in the engine's. A decoder's pooler reads the engine's own model: its
forward keeps no state between calls (no cache is passed), so it may run while the engine decodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sparkgpt.data.batch import pad_rows
from sparkgpt.errors import SparkGPTError
from sparkgpt.lm import LM
from sparkgpt.model.transformer import Encoder


class Pooler:
    """One vector per input for a model: `embed(rows of token ids) -> float32 [N, dim]`, each row of norm 1, in the
    weights' own dtype (as `LM.embed` gives them by default: served vectors never depend on the server's CPU).

    context: the longest input in tokens (an encoder's own limit; for a decoder the engine's slot length, which
    bounds the memory one forward takes)."""

    def __init__(self, lm: LM, context: int | None = None, batch_size: int = 32) -> None:
        model = lm.model
        self.encoder = isinstance(model, Encoder)
        if not self.encoder and not callable(getattr(model, "hidden_states", None)):
            raise SparkGPTError(f"this model cannot embed text: it is {type(model).__name__} "
                                f"({lm.config.architecture!r}), neither an encoder nor a decoder")
        self.lm, self.model, self.batch_size = lm, model, batch_size
        self.dim = lm.config.d_model
        self.vocab_size = lm.config.vocab_size
        self.context = min(context or lm.config.max_seq_len, lm.config.max_seq_len)
        self.pad = lm.config.pad_token_id or 0
        self.device = next(model.parameters()).device

    def encode(self, text: str) -> list[int]:
        """A text as the ids the model embeds (an encoder's [CLS] ... [SEP], as `LM.embed` has them)."""
        return self.lm.encode(text)

    def embed(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [len(rows), dim]. Rows go in batches of similar lengths (as `LM.embed` batches them), and come
        back in their order."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                ids, mask = pad_rows([rows[i] for i in batch], self.pad)
                ids, mask = ids.to(self.device), mask.to(self.device)
                if self.encoder:
                    vectors = self.model.sentence_embeddings(ids, mask)
                else:
                    # Padding goes at the end of each row, so a causal model's real tokens never see it: each
                    # row's states are those it has alone. The mean is over its real tokens only.
                    hidden = self.model.hidden_states(ids).float()
                    weights = mask.to(hidden.dtype)[..., None]
                    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
                    vectors = torch.nn.functional.normalize(pooled, dim=-1)
                out[batch] = vectors.float().cpu().numpy()
        return out
