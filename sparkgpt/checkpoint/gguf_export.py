"""GGUF export: a decoder and its tokenizer as one llama.cpp file (llama.cpp, Ollama, LM Studio).

The file is what llama.cpp's convert_hf_to_gguf.py writes: GGUF v3, `general.*` and `<arch>.*` metadata, the
tokenizer (`tokenizer.ggml.model` "gpt2" with its merges, or SentencePiece's "llama" with scores) and chat template,
and the tensors under GGUF's names (`gguf.llama_tensor_names`, the reader's table). The llama.cpp architecture
follows the model's family, one row of `ARCHITECTURES` each:

    llama    Llama, Phi-3 (its math is Llama's: written unfused), Mistral whose window covers its context; the
             Q/K rows permuted for ggml's rope (`gguf.permute_rope_rows`)
    qwen2    + q/k/v biases                    (rope "neox": rows as they are, here and below)
    qwen3    + per-head q/k RMSNorms
    gemma3   GeGLU, sandwich norms, q/k norms; llama.cpp stores Gemma's RMSNorm as 1 + w, which is our g as it is;
             it fixes in code the embeddings' √d scale, one global layer in six, the local layers' rope base 10,000
             and scores × head_dim^-½, so a model that differs in those is refused, as are soft-capped logits
    gemma2   Gemma 3 less the q/k norms, plus the soft-caps of scores and logits (which llama.cpp always applies);
             it fixes one global layer in two, one rope base, the embedding as output matrix and scores ×
             head_dim^-½ (d_model / n_heads in the 46-layer 27B): a model that differs in those is refused

llama.cpp's llama, qwen2 and qwen3 have no sliding window: a model whose window is shorter than its context is
refused, as is any other family (mixtures of experts, GPT-2, ...) and rope scaling. The tokenizer goes out as
`gguf_tokenizer.tokenizer_metadata` writes it: byte-level BPE as "gpt2", SentencePiece-style BPE as "llama".
Weight types:

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

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkgpt.checkpoint.families import family_for
from sparkgpt.checkpoint.gguf import (
    _GEMMA3_GLOBAL_EVERY,
    _GEMMA3_LOCAL_ROPE_THETA,
    _INTERLEAVED_ROPE,
    _SCALAR_TYPES,
    ARRAY,
    DEFAULT_ALIGNMENT,
    F16,
    F32,
    FLOAT32,
    GEMMA2_DEFAULTS,
    GGML_TYPES,
    MAGIC,
    Q4_0,
    Q8_0,
    STRING,
    UINT32,
    gemma2_query_pre_attn_scalar,
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

def _window_covers_context(config: ModelConfig, arch: str) -> str | None:
    """llama.cpp's llama, qwen2 and qwen3 attend densely: a window shorter than the context cannot be written."""
    if "local" in config.layer_patterns() and config.attention_window < config.max_seq_len:
        return f"a sliding window ({config.attention_window}) shorter than its context ({config.max_seq_len}), " \
            f"which llama.cpp's {arch} architecture does not have"
    return None


def _gemma3_pattern(n_layers: int) -> list[str]:
    return ["dense" if (i + 1) % _GEMMA3_GLOBAL_EVERY == 0 else "local" for i in range(n_layers)]


def _gemma3_unsupported(config: ModelConfig, arch: str) -> str | None:
    """What llama.cpp's gemma3 fixes in code rather than reading from the file, and this model has otherwise."""
    if config.attn_logit_softcap is not None or config.final_logit_softcap is not None:
        return "soft-capped attention scores or logits"
    if not math.isclose(config.attention_scale, config.head_dim ** -0.5, rel_tol=1e-6):
        return f"query_pre_attn_scalar {config.attention_scale ** -2:g}, not its head width {config.head_dim} " \
            "(llama.cpp's gemma3 scales scores by head_dim^-1/2)"
    if config.rope_local_theta != _GEMMA3_LOCAL_ROPE_THETA:
        return f"a local rope base of {config.rope_local_theta:g} (llama.cpp's gemma3 uses " \
            f"{_GEMMA3_LOCAL_ROPE_THETA:g})"
    if config.layer_patterns() != _gemma3_pattern(config.n_layers):
        return f"layer pattern {''.join(p[0] for p in config.layer_patterns())} (l local, d dense): llama.cpp's " \
            f"gemma3 makes every {_GEMMA3_GLOBAL_EVERY}th layer global and the others local"
    return None


def _gemma2_unsupported(config: ModelConfig, arch: str) -> str | None:
    """What llama.cpp's gemma2 fixes in code rather than reading from the file, and this model has otherwise."""
    if config.attn_logit_softcap is None or config.final_logit_softcap is None:
        return "no soft-cap on its attention scores or logits (llama.cpp's gemma2 always caps both)"
    if not config.tie_embeddings:
        return "an output matrix of its own (llama.cpp's gemma2 reuses the token embedding)"
    scalar = gemma2_query_pre_attn_scalar(config.n_layers, config.d_model, config.n_heads, config.head_dim)
    if not math.isclose(config.attention_scale, scalar ** -0.5, rel_tol=1e-6):
        return f"query_pre_attn_scalar {config.attention_scale ** -2:g}, not the {scalar:g} llama.cpp's gemma2 " \
            "assumes for its shape (head_dim; d_model / n_heads in 46 layers)"
    every = GEMMA2_DEFAULTS["attention.sliding_window_pattern"]
    expected = ["dense" if (i + 1) % every == 0 else "local" for i in range(config.n_layers)]
    if config.layer_patterns() != expected:
        return f"layer pattern {''.join(p[0] for p in config.layer_patterns())} (l local, d dense): llama.cpp's " \
            "gemma2 alternates local and global layers, local first"
    return None


@dataclass(frozen=True)
class Architecture:
    """One llama.cpp architecture as we write it: its name (general.architecture and the keys' prefix), what of a
    model it cannot hold (a reason, or None), and its keys beyond the shared ones. The tensors are the reader's
    table (`llama_tensor_names`), whose optional ones (biases, q/k norms, sandwich norms) the config selects."""

    name: str
    unsupported: Callable[[ModelConfig, str], str | None] = lambda config, arch: None
    keys: dict[str, tuple[int, Callable[[ModelConfig], Any]]] = field(default_factory=dict)


# Our family (`families.family_for`) -> the llama.cpp architecture it is written as.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama"),
    "mistral": Architecture("llama", _window_covers_context),
    "qwen2": Architecture("qwen2", _window_covers_context),
    "qwen3": Architecture("qwen3", _window_covers_context),
    "gemma3_text": Architecture("gemma3", _gemma3_unsupported, {
        "attention.sliding_window": (UINT32, lambda config: config.attention_window),
    }),
    "gemma2": Architecture("gemma2", _gemma2_unsupported, {
        "attention.sliding_window": (UINT32, lambda config: config.attention_window),
        "attn_logit_softcapping": (FLOAT32, lambda config: config.attn_logit_softcap),
        "final_logit_softcapping": (FLOAT32, lambda config: config.final_logit_softcap),
    }),
}
# Families we know and do not write, and why (anything else is named by its shape).
REFUSED = {
    "mixtral": "a mixture of experts (Mixtral)",
    "gpt2": "GPT-2 (learned positions, LayerNorm, biases)",
    "gpt_neo": "GPT-Neo (learned positions, LayerNorm, biases)",
    "bert": "an encoder (BERT)",
    "t5": "an encoder–decoder (T5)",
}
SUPPORTED = "Llama-family models (Llama, Mistral, Phi-3: decoder, RoPE, RMSNorm, SwiGLU, no biases), Qwen2, " \
    "Qwen3, Gemma 2 and Gemma 3"


def architecture_for(config: ModelConfig) -> Architecture:
    """The llama.cpp architecture this model is written as, or a one-line error naming what it cannot hold."""
    family = family_for(config)
    if family is None or family.model_type not in ARCHITECTURES:
        kind = REFUSED.get(family.model_type, family.model_type) if family is not None else \
            f"{config.architecture} ({config.positions} positions, {config.norm}, {config.ffn})"
        raise SparkGPTError(f"GGUF export supports {SUPPORTED}; this model is {kind}")
    arch = ARCHITECTURES[family.model_type]
    reason = "biases on every projection" if config.bias else arch.unsupported(config, arch.name)
    if reason is not None:
        raise SparkGPTError(f"GGUF export ({arch.name}): this {family.model_type} model has {reason}; "
                            "export it as an HF checkpoint directory instead")
    if config.rope_scaling is not None:
        raise SparkGPTError(f"GGUF export does not write rope scaling ({config.rope_scaling['rope_type']}) yet; "
                            "export the model as an HF checkpoint directory instead")
    return arch


def model_metadata(config: ModelConfig, name: str, dtype: str) -> dict[str, tuple[int, Any]]:
    """general.* and <arch>.* keys -> (GGUF value type, value), as llama.cpp's converter writes them."""
    file_type = check_dtype(dtype)[1]
    arch = architecture_for(config)
    shared: dict[str, tuple[int, Any]] = {
        "vocab_size": (UINT32, config.vocab_size),
        "context_length": (UINT32, config.max_seq_len),
        "embedding_length": (UINT32, config.d_model),
        "block_count": (UINT32, config.n_layers),
        "feed_forward_length": (UINT32, config.d_ff),
        "attention.head_count": (UINT32, config.n_heads),
        "attention.head_count_kv": (UINT32, config.n_kv_heads),
        "rope.freq_base": (FLOAT32, config.rope_theta),
        "attention.layer_norm_rms_epsilon": (FLOAT32, config.norm_eps),
        "rope.dimension_count": (UINT32, config.head_dim),
    }
    if config.head_dim != config.d_model // config.n_heads:  # llama.cpp assumes d_model / n_heads otherwise
        shared["attention.key_length"] = (UINT32, config.head_dim)
        shared["attention.value_length"] = (UINT32, config.head_dim)
    shared |= {key: (value_type, value(config)) for key, (value_type, value) in arch.keys.items()}
    metadata: dict[str, tuple[int, Any]] = {
        "general.architecture": (STRING, arch.name),
        "general.type": (STRING, "model"),
        "general.name": (STRING, name),
        **{f"{arch.name}.{key}": value for key, value in shared.items()},
        "general.file_type": (UINT32, file_type),
    }
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


# The tokens llama.cpp's vocabulary loader looks up (and fails without) when general.name contains "phi3" or "phi-3".
_PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def write_gguf(model: torch.nn.Module, tokenizer: Tokenizer | None, path: str | Path, dtype: str = "f16",
               name: str | None = None) -> Path:
    """Write a GPT of a family llama.cpp reads (`ARCHITECTURES`) and its tokenizer as a GGUF v3 file (`dtype`: f32,
    f16, q8_0, q4_0)."""
    check_dtype(dtype)
    path = Path(path)
    config: ModelConfig = model.config
    arch = architecture_for(config)
    interleaved = arch.name in _INTERLEAVED_ROPE
    state = model.state_dict()
    names = llama_tensor_names(config)
    tied_head = {"lm_head.weight"} if config.tie_embeddings else set()  # the embedding again, under its own name
    mismatched = sorted(set(state).symmetric_difference(names) - tied_head)
    if mismatched:
        raise SparkGPTError(f"GGUF export: the model's tensors {mismatched[:5]} do not match a {arch.name} "
                            "model's (a quantised model? export it before quantising)")
    output_name = names["lm_head.weight" if "lm_head.weight" in names else "token_embedding.weight"]
    name = name or path.stem
    metadata = {**model_metadata(config, name, dtype), **tokenizer_metadata(tokenizer, config)}
    missing = [token for token in _PHI3_NAME_TOKENS if token not in metadata["tokenizer.ggml.tokens"][1]]
    if any(part in name.lower() for part in ("phi3", "phi-3")) and missing:
        raise SparkGPTError(f"GGUF export: llama.cpp treats a model named {name!r} as Phi-3 and looks up "
                            f"{', '.join(missing)} in its vocabulary, which this tokenizer lacks; give the file "
                            "another name")

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
            if interleaved and ours.endswith("attn.q_proj.weight"):
                weight = permute_rope_rows(weight, config.n_heads)
            elif interleaved and ours.endswith("attn.k_proj.weight"):
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
