"""The serving engine's KV cache: one row per slot, each sequence writing and reading its own columns."""

from __future__ import annotations

import torch

from sparkgpt.config import ModelConfig
from sparkgpt.model import KVCache


class SlotKVCache(KVCache):
    """Keys and values of every slot: [layers, slots, kv_heads, context, head_dim], allocated once.

    Before each forward `begin` says which slot each batch row is and at which column each of its tokens writes
    its key/value; attention then reads columns [0, span) of those slots, and the forward's mask says which of
    them each query may see. A decode step's rows are slots 0..B-1 (read in place, no copy); a batched prefill's
    rows are the newcomers' slots (gathered). The last column is scratch: tokens that are not a sequence's (rows
    not decoding, a prefill's padding) write there, and no sequence ever uses it, since a request is admitted only
    if prompt + max_tokens <= context (and the last sampled token is never fed back).
    """

    def __init__(self, config: ModelConfig, slots: int, context: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config, slots, context, dtype, device)
        self.scratch_column = context - 1
        self._all_slots = torch.arange(slots, device=device)
        self._slots: torch.Tensor | None = None
        self._columns = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self._span = 1

    def begin(self, slots: torch.Tensor | None, columns: torch.Tensor, span: int) -> None:
        """The coming forward's rows: their slots [B] (None: slots 0..B-1), the columns [B, T] their tokens write,
        and how many columns attention reads."""
        self._slots, self._columns, self._span = slots, columns, span
        # GPT.forward checks `length + T` against the context (positions are passed, never defaulted from it).
        self.length = span - columns.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, T, d] at each row's columns; return the rows' keys and values [B, H_kv, span, d]."""
        batch = k.shape[0]
        slots = self._all_slots[:batch] if self._slots is None else self._slots
        self.keys[layer, slots[:, None], :, self._columns] = k.transpose(1, 2)
        self.values[layer, slots[:, None], :, self._columns] = v.transpose(1, 2)
        if self._slots is None:
            return self.keys[layer, :batch, :, : self._span], self.values[layer, :batch, :, : self._span]
        return self.keys[layer, slots, :, : self._span], self.values[layer, slots, :, : self._span]

    def clear(self, slot: int) -> None:
        """Zero every column of one slot: a sequence whose numbers blew up (NaN, inf) leaves none behind. (A later
        sequence in the slot attends to stale columns with weight 0, but 0 × NaN is NaN.)"""
        self.keys[:, slot].zero_()
        self.values[:, slot].zero_()

    def write_columns(self, batch: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        if self._columns.shape[1] != 1:
            raise RuntimeError("a decode step writes one column per row (begin(..., columns [B, 1], ...))")
        return self._columns[:batch, 0].contiguous(), self._span, self._slots

    def reorder(self, rows: torch.Tensor) -> None:
        """Slots are sequences of their own: beam search's reordering of rows has no meaning here."""
        raise NotImplementedError("a slot cache is not reordered (beam search runs on a KVCache of its own)")

    def advance(self, n_tokens: int) -> None:
        pass  # each slot's length is the engine's bookkeeping
