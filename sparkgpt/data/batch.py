"""Ragged token rows as one padded batch: the one place sequences of different lengths are padded."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(
    rows: Sequence[Sequence[int]], pad: int = 0, left: bool = False, width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [len(rows), width], mask [len(rows), width]) int64: each row at the start of its line (at the end with
    `left`, as generation wants, so every row's last token is in the last column), `pad` elsewhere; the mask is 1
    on real tokens. `width` defaults to the longest row."""
    width = max((len(row) for row in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        if not row:
            continue
        columns = slice(width - len(row), width) if left else slice(0, len(row))
        ids[index, columns] = torch.tensor(list(row), dtype=torch.long)
        mask[index, columns] = 1
    return ids, mask
