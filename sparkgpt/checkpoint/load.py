"""The one place that turns a model reference into a model and its tokenizer, and a model back into a checkpoint.

A reference is a checkpoint directory (ours, transformers', quantised, an FSDP run's DCP shards, or CTranslate2's
Whisper), a `.gguf` file, an alias, a hub id (`registry.resolve`), or a LoRA adapter folder naming its base.
Everything that loads a model (the LM object, the trainer, distillation, GGUF export, `prepare`) comes through `load`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sparkgpt.checkpoint import adapter as adapters
from sparkgpt.checkpoint import dcp, gguf, gguf_tokenizer, hf, quantized, vision, whisper
from sparkgpt.checkpoint.registry import resolve
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_directory
from sparkgpt.model import quant
from sparkgpt.model.lora import has_lora, merge_lora
from sparkgpt.tokenizer import TOKENIZER_FILE, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Loaded(NamedTuple):
    model: nn.Module
    tokenizer: Tokenizer | None


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SparkGPTError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(
    ref: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto",
    adapter: str | Path | None = None, merge: bool = True, quantize: str | None = None,
) -> Loaded:
    """(model, tokenizer or None) of a model reference; see `sparkgpt.load` for the options."""
    path = resolve(ref)
    if adapters.is_adapter(path):
        if adapter is not None:
            raise SparkGPTError(f"{ref} is itself an adapter; pass its base model as the reference")
        adapter, path = path, resolve(adapters.base_reference(path))
    if quantize is not None:
        quant.check_method(quantize)
    model, tokenizer = _load_base(path, pick_dtype(dtype), pick_device(device),
                                  quantize if adapter is None else None)
    if adapter is not None:
        adapter_dir = resolve(adapter)
        if not adapters.is_adapter(adapter_dir):
            raise SparkGPTError(f"{adapter}: not a LoRA adapter folder (no {adapters.ADAPTER_CONFIG_FILE})")
        model = adapters.attach_adapter(model, adapter_dir, merge)
    if quantize is not None:
        quant.quantize_loaded(model, quantize)
    return Loaded(model, tokenizer)


def _load_base(path: Path, dtype: torch.dtype, device: torch.device, quantize: str | None) -> Loaded:
    if path.is_file():
        file = gguf.read_gguf(path)
        tokenizer = gguf_tokenizer.read_tokenizer(file.metadata, source=str(path))
        return Loaded(gguf.load_gguf_model(file, dtype=dtype, device=device, quantize=quantize), tokenizer)
    if dcp.is_dcp_checkpoint(path):  # an FSDP run's checkpoint: its shards gathered into one model
        model = dcp.load_model(path, dtype=dtype, device=device)
    elif whisper.checkpoint_kind(path) is not None:  # transformers' Whisper, or CTranslate2's model.bin
        model = whisper.load_model(path, dtype=dtype, device=device)
    elif vision.checkpoint_kind(path) is not None:  # transformers' ViT, CLIP or VisionEncoderDecoderModel
        model = vision.load_model(path, dtype=dtype, device=device)
    elif quantized.is_quantized_checkpoint(path):
        model = quantized.load_model(path, dtype, device)
    else:
        model = hf.load_model(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(path) if (path / TOKENIZER_FILE).is_file() else None
    if tokenizer is not None:
        # A tokenizer.json may carry fixed padding and truncation (MiniLM's: 128); transformers overrides them per
        # call, and so do we: a text encodes whole, and batches are padded by the code that batches them.
        tokenizer.backend.no_padding()
        tokenizer.backend.no_truncation()
    return Loaded(model, tokenizer)


def save(out_dir: str | Path, model: nn.Module, tokenizer: Tokenizer | None) -> Path:
    """Write an HF-compatible checkpoint directory, atomically (a crash leaves any old one intact): quantised
    models in our quantised format, LoRA layers kept separate saved merged into the weights."""
    model = merge_lora(copy.deepcopy(model)) if has_lora(model) else model
    with atomic_directory(out_dir) as staging:
        write_model(staging, model)
        if tokenizer is not None:
            tokenizer.save(staging)
    return Path(out_dir)


def write_model(directory: Path, model: nn.Module) -> None:
    """A model's weights and config into `directory` (already staged), in the format its kind is read back from:
    our quantised format, transformers' vision formats (ViT, CLIP, VisionEncoderDecoderModel), or a transformers
    family / our own config."""
    if quant.is_quantized(model):
        quantized.write_model(directory, model)
    elif vision.is_vision_model(model):
        vision.write_model(directory, model)
    else:
        hf.write_model(directory, model)
