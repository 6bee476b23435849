"""Model references, resolved in one place so every command accepts the same forms.

Today a reference is a checkpoint directory (ours or a transformers one). Aliases, GGUF files and hub ids
resolve here too as they arrive.
"""

from __future__ import annotations

from pathlib import Path

from sparkgpt.errors import SparkGPTError


def resolve(ref: str | Path) -> Path:
    """The checkpoint directory a reference names, or a one-line error saying what was expected."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SparkGPTError(f"{path}: not a checkpoint directory (no config.json)")
        return path
    if path.exists():
        raise SparkGPTError(f"{path}: expected a checkpoint directory (config.json + model.safetensors)")
    raise SparkGPTError(f"{ref}: no such checkpoint directory")
