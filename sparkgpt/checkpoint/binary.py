"""A cursor over a binary checkpoint's bytes (GGUF, CTranslate2) that never reads past the end: every length and
count is checked against the bytes left before anything is allocated, and a failure names the file and offset."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from sparkgpt.errors import SparkGPTError


class BoundedReader:
    def __init__(self, path: Path, buffer: memoryview) -> None:
        self.path, self.buffer, self.size, self.pos = path, buffer, len(buffer), 0

    def fail(self, message: str, at: int | None = None) -> SparkGPTError:
        return SparkGPTError(f"{self.path}: at byte {self.pos if at is None else at}: {message}")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n_bytes: int, what: str) -> None:
        if n_bytes > self.left:
            raise self.fail(f"{what} needs {n_bytes} bytes but only {self.left} are left (truncated file?)")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def count(self, what: str, min_bytes_each: int, fmt: str) -> int:
        """A count (`fmt`) of items that each take at least `min_bytes_each` bytes: more than fit is corrupt."""
        start = self.pos
        n = self.unpack(fmt, what)
        if n * min_bytes_each > self.left:
            raise self.fail(f"{what} {n} needs at least {n * min_bytes_each} bytes but only {self.left} are left",
                            at=start)
        return n
