"""GGUF export: a Llama-family model and its tokenizer as one llama.cpp file (llama.cpp, Ollama, LM Studio).

The file is what llama.cpp's convert_hf_to_gguf.py writes for a Llama model: GGUF v3, `general.*` and `llama.*`
metadata, a byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2" with its merges) and chat template, and the
tensors under GGUF's names with the Q/K rows permuted for ggml's rope (`gguf.permute_rope_rows`). Weight types:

    f32, f16   every matrix in that type
    q8_0       every matrix Q8_0, token embedding and output included (as the converter's --outtype q8_0)
    q4_0       every matrix Q4_0 except the output matrix (output.weight, or token_embd.weight when tied): Q8_0.
               llama-quantize gives that matrix Q6_K, falling back to Q8_0 where rows are not a multiple of 256
               (SmolLM2's 576); we write no K-quants, so it is Q8_0 always.

1-D tensors (the norms) are F32, as llama.cpp requires; a matrix whose rows are not a whole number of blocks
is F16 (the converter's fallback). Q8_0 and Q4_0 are ggml's reference quantisers in vectorised numpy, bit for
bit as the `gguf` package's `gguf.quants.quantize` (which this module does not import). The file is written
tensor by tensor into a temporary file beside the target and renamed over it only when complete (files.atomic_file).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkgpt.checkpoint.families import family_for
from sparkgpt.checkpoint.gguf import (
    _SCALAR_TYPES,
    ARRAY,
    DEFAULT_ALIGNMENT,
    F16,
    F32,
    FLOAT32,
    GGML_TYPES,
    MAGIC,
    Q4_0,
    Q8_0,
    STRING,
    UINT32,
    llama_tensor_names,
    permute_rope_rows,
)
from sparkgpt.checkpoint.gguf_tokenizer import tokenizer_metadata
from sparkgpt.checkpoint.load import load
from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_file
from sparkgpt.tokenizer import Tokenizer

VERSION = 3
# --dtype -> (ggml type of the matrices, general.file_type: llama.cpp's LLAMA_FTYPE_ALL_F32, _MOSTLY_F16, ...).
DTYPES: dict[str, tuple[int, int]] = {"f32": (F32, 0), "f16": (F16, 1), "q8_0": (Q8_0, 7), "q4_0": (Q4_0, 2)}
QUANTIZATION_VERSION = 2  # ggml's block layouts; llama.cpp's converter writes it for quantised files
_F16_MAX = float(np.finfo(np.float16).max)


def check_dtype(dtype: str) -> tuple[int, int]:
    """(ggml type of the matrices, general.file_type) for a --dtype, or a one-line error naming the choices."""
    if dtype not in DTYPES:
        raise SparkGPTError(f"GGUF dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---- quantisation -----------------------------------------------------------------------------------------

def _round_half_away(values: np.ndarray) -> np.ndarray:
    """C's roundf in float32. np.round rounds halves to even, and trunc(|x| + 0.5) can round 0.49999997 up."""
    magnitude = np.abs(values)
    whole = np.floor(magnitude)
    return np.sign(values) * (whole + np.floor(2 * (magnitude - whole)))


def _reciprocal(scales: np.ndarray) -> np.ndarray:
    """1 / scale, and 0 for an all-zero block (whose values then all quantise to the zero point)."""
    return np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales != 0)


def quantize_q8_0(values: np.ndarray) -> np.ndarray:
    """float32 [..., 32·k] -> Q8_0 blocks uint8 [n_blocks, 34]: d = max|x| / 127 (f16), q = roundf(x / d)."""
    blocks = values.reshape(-1, 32).astype(np.float32, copy=False)
    scales = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    quants = _round_half_away(blocks * _reciprocal(scales)).astype(np.int8)
    return np.concatenate([scales.astype("<f2").view(np.uint8), quants.view(np.uint8)], axis=1)


def quantize_q4_0(values: np.ndarray) -> np.ndarray:
    """float32 [..., 32·k] -> Q4_0 blocks uint8 [n_blocks, 18]: d = -(the value of largest magnitude) / 8 (f16),
    q = min(15, trunc(x / d + 8.5)), the block's first 16 values in the low nibbles and the last 16 in the high."""
    blocks = values.reshape(-1, 32).astype(np.float32, copy=False)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    scales = extreme / np.float32(-8)
    quants = np.trunc(blocks * _reciprocal(scales) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    packed = quants[:, :16] | (quants[:, 16:] << np.uint8(4))
    return np.concatenate([scales.astype("<f2").view(np.uint8), packed], axis=1)


def encode_tensor(values: np.ndarray, ggml_type: int) -> np.ndarray:
    """A float32 array (torch's dimension order) as the bytes of a GGUF tensor of `ggml_type`."""
    if ggml_type == F32:
        return values.astype("<f4").reshape(-1).view(np.uint8)
    if ggml_type == F16:
        return values.astype("<f2").reshape(-1).view(np.uint8)
    if ggml_type == Q8_0:
        return quantize_q8_0(values).reshape(-1)
    if ggml_type == Q4_0:
        return quantize_q4_0(values).reshape(-1)
    raise SparkGPTError(f"cannot write ggml type {GGML_TYPES[ggml_type][0]}; supported: F32, F16, Q8_0, Q4_0")


def tensor_type(name: str, shape: tuple[int, ...], dtype: str, output_name: str) -> int:
    """The ggml type a tensor is written in (see the module docstring for why)."""
    matrix_type = check_dtype(dtype)[0]
    if len(shape) == 1:
        return F32
    if matrix_type == Q4_0 and name == output_name:
        matrix_type = Q8_0
    return F16 if shape[-1] % GGML_TYPES[matrix_type][1] else matrix_type


# ---- metadata ---------------------------------------------------------------------------------------------

def _check_llama(config: ModelConfig) -> None:
    family = family_for(config)
    if family is None or family.model_type != "llama" or config.bias:
        kind = family.model_type if family is not None else f"{config.architecture} ({config.positions} positions, " \
            f"{config.norm}, {config.ffn})"
        raise SparkGPTError(f"GGUF export supports Llama-family models (decoder, RoPE, RMSNorm, SwiGLU, no biases, "
                            f"no experts); this model is {kind}")
    if config.rope_scaling is not None:
        raise SparkGPTError(f"GGUF export does not write rope scaling ({config.rope_scaling['rope_type']}) yet; "
                            "export the model as an HF checkpoint directory instead")


def model_metadata(config: ModelConfig, name: str, dtype: str) -> dict[str, tuple[int, Any]]:
    """general.* and llama.* keys -> (GGUF value type, value), as llama.cpp's converter writes them."""
    file_type = check_dtype(dtype)[1]
    metadata: dict[str, tuple[int, Any]] = {
        "general.architecture": (STRING, "llama"),
        "general.type": (STRING, "model"),
        "general.name": (STRING, name),
        "llama.vocab_size": (UINT32, config.vocab_size),
        "llama.context_length": (UINT32, config.max_seq_len),
        "llama.embedding_length": (UINT32, config.d_model),
        "llama.block_count": (UINT32, config.n_layers),
        "llama.feed_forward_length": (UINT32, config.d_ff),
        "llama.attention.head_count": (UINT32, config.n_heads),
        "llama.attention.head_count_kv": (UINT32, config.n_kv_heads),
        "llama.rope.freq_base": (FLOAT32, config.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": (FLOAT32, config.norm_eps),
        "llama.rope.dimension_count": (UINT32, config.head_dim),
        "general.file_type": (UINT32, file_type),
    }
    if config.head_dim != config.d_model // config.n_heads:  # llama.cpp assumes d_model / n_heads otherwise
        metadata["llama.attention.key_length"] = (UINT32, config.head_dim)
        metadata["llama.attention.value_length"] = (UINT32, config.head_dim)
    if file_type not in (DTYPES["f32"][1], DTYPES["f16"][1]):
        metadata["general.quantization_version"] = (UINT32, QUANTIZATION_VERSION)
    return metadata


# ---- encoding ---------------------------------------------------------------------------------------------

def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(value_type: int | tuple[int, int], value: Any) -> bytes:
    """A metadata value's type and bytes; (ARRAY, element type) for an array."""
    if isinstance(value_type, tuple):
        element_type = value_type[1]
        header = struct.pack("<IIQ", ARRAY, element_type, len(value))
        if element_type == STRING:
            return header + b"".join(_string(item) for item in value)
        return header + np.asarray(value, dtype=_SCALAR_TYPES[element_type][1]).tobytes()
    if value_type == STRING:
        return struct.pack("<I", STRING) + _string(value)
    return struct.pack("<I", value_type) + np.asarray(value, dtype=_SCALAR_TYPES[value_type][1]).tobytes()


def _padding(position: int, alignment: int) -> bytes:
    return b"\x00" * (-position % alignment)


def write_gguf(model: torch.nn.Module, tokenizer: Tokenizer | None, path: str | Path, dtype: str = "f16",
               name: str | None = None) -> Path:
    """Write a Llama-family GPT and its tokenizer as a GGUF v3 file (`dtype`: f32, f16, q8_0, q4_0)."""
    check_dtype(dtype)
    path = Path(path)
    config: ModelConfig = model.config
    _check_llama(config)
    state = model.state_dict()
    names = llama_tensor_names(config)
    tied_head = {"lm_head.weight"} if config.tie_embeddings else set()  # the embedding again, under its own name
    mismatched = sorted(set(state).symmetric_difference(names) - tied_head)
    if mismatched:
        raise SparkGPTError(f"GGUF export: the model's tensors {mismatched[:5]} do not match a Llama model's "
                            "(a quantised model? export it before quantising)")
    output_name = names["lm_head.weight" if "lm_head.weight" in names else "token_embedding.weight"]
    metadata = {**model_metadata(config, name or path.stem, dtype), **tokenizer_metadata(tokenizer, config)}

    plan = []  # (our name, GGUF name, torch shape, ggml type, offset in the data section)
    offset = 0
    for ours, theirs in names.items():
        shape = tuple(state[ours].shape)
        ggml_type = tensor_type(theirs, shape, dtype, output_name)
        plan.append((ours, theirs, shape, ggml_type, offset))
        _, block_size, type_size = GGML_TYPES[ggml_type]
        offset += int(np.prod(shape)) // block_size * type_size
        offset += -offset % DEFAULT_ALIGNMENT

    header = [MAGIC, struct.pack("<IQQ", VERSION, len(plan), len(metadata))]
    header += [_string(key) + _value(value_type, value) for key, (value_type, value) in metadata.items()]
    for _, theirs, shape, ggml_type, tensor_offset in plan:
        dims = shape[::-1]  # GGUF lists the fastest-varying dimension first
        header.append(_string(theirs) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, tensor_offset))
    header_bytes = b"".join(header)

    with atomic_file(path) as file:
        file.write(header_bytes + _padding(len(header_bytes), DEFAULT_ALIGNMENT))
        for ours, _, _, ggml_type, _ in plan:
            weight = state[ours].detach().to(device="cpu", dtype=torch.float32)
            if ours.endswith("attn.q_proj.weight"):
                weight = permute_rope_rows(weight, config.n_heads)
            elif ours.endswith("attn.k_proj.weight"):
                weight = permute_rope_rows(weight, config.n_kv_heads)
            values = weight.contiguous().numpy()
            if not np.isfinite(values).all() or (ggml_type == F16 and np.abs(values).max() > _F16_MAX):
                raise SparkGPTError(f"GGUF export: tensor {ours} has values that are not finite or exceed float16's "
                                    f"range ({_F16_MAX:g})")
            data = encode_tensor(values, ggml_type)
            file.write(data.tobytes())
            file.write(_padding(data.size, DEFAULT_ALIGNMENT))
    return path


def export_gguf(ref: str | Path, path: str | Path, dtype: str = "f16", name: str | None = None) -> Path:
    """Load any model reference (directory, .gguf, alias, hub id) in float32 and write it as a GGUF file."""
    check_dtype(dtype)  # before the (slow) load
    model, tokenizer = load(ref, dtype="float32", device="cpu")
    return write_gguf(model, tokenizer, path, dtype=dtype, name=name)
