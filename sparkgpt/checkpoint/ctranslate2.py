"""CTranslate2's `model.bin` (faster-whisper's format): a careful reader, and Whisper's variables onto our model.

The file is, all little-endian (binary versions 4 to 6, the layout CTranslate2 has written since version 4):

    version u32 | spec name: string | spec revision u32 | variable count u32
    count × (name: string | rank u8 | dims u32 × rank | dtype u8 | byte count u32 | the bytes)
    alias count u32 | count × (alias: string | variable name: string)

where a string is a u16 length (counting a closing NUL byte), then that many bytes, the last one NUL. Dtypes are
float32, int8, int16, int32, float16 and bfloat16 (ids 0-5); int8/int16 weights come with a float `<name>_scale`
(per output row or one for all), the quantised value being weight × scale. Configuration flags (number of heads,
activation, pre-norm, ...) are variables of rank 0.

Every count, length and size is checked against the bytes the file has left before anything is allocated, so a
corrupt or truncated file is a one-line SparkGPTError naming the file and the byte offset. The file is
memory-mapped; a tensor's bytes are copied out when it is asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkgpt.checkpoint.binary import BoundedReader
from sparkgpt.errors import SparkGPTError
from sparkgpt.model.whisper import WhisperConfig, whisper_config

MODEL_FILE = "model.bin"
SUPPORTED_VERSIONS = (4, 5, 6)
MAX_RANK = 8
# dtype id -> (name, torch dtype); numpy lacks bfloat16, so bytes become torch tensors directly.
DTYPES: dict[int, tuple[str, torch.dtype]] = {
    0: ("float32", torch.float32), 1: ("int8", torch.int8), 2: ("int16", torch.int16), 3: ("int32", torch.int32),
    4: ("float16", torch.float16), 5: ("bfloat16", torch.bfloat16),
}
_QUANTISED = {1, 2}


@dataclass(frozen=True)
class CT2Variable:
    name: str
    shape: tuple[int, ...]
    dtype_id: int
    offset: int  # absolute byte offset of the data
    n_bytes: int

    @property
    def dtype_name(self) -> str:
        return DTYPES[self.dtype_id][0]


class CT2File:
    """A parsed model.bin: spec name and revision, the variables (aliases resolved), bytes read on demand."""

    def __init__(self, path: Path, version: int, spec: str, revision: int, variables: dict[str, CT2Variable],
                 aliases: dict[str, str], data: np.ndarray) -> None:
        self.path, self.version, self.spec, self.revision = path, version, spec, revision
        self.variables = variables
        self.aliases = aliases  # alias -> variable name (Whisper: the output projection is the embedding)
        self._data = data

    def __repr__(self) -> str:
        return f"CT2File({str(self.path)!r}, {self.spec} rev {self.revision}, {len(self.variables)} variables)"

    def info(self, name: str) -> CT2Variable:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise SparkGPTError(f"{self.path}: no variable named {name!r}")
        return self.variables[name]

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def tensor(self, name: str) -> torch.Tensor:
        """The variable in its stored dtype and shape (a copy, so the memory map can close)."""
        info = self.info(name)
        raw = torch.from_numpy(np.array(self._data[info.offset:info.offset + info.n_bytes]))
        return raw.view(DTYPES[info.dtype_id][1]).reshape(info.shape)

    def weight(self, name: str) -> torch.Tensor:
        """A float32 weight, dequantised with its `_scale` when stored as int8/int16."""
        info = self.info(name)
        value = self.tensor(name)
        if info.dtype_id not in _QUANTISED:
            return value.float()
        scale_name = self.aliases.get(name, name) + "_scale"
        if scale_name not in self.variables:
            raise SparkGPTError(f"{self.path}: at byte {info.offset}: {info.dtype_name} variable {name} has no "
                                f"{scale_name}")
        scale = self.tensor(scale_name).float()
        if scale.numel() not in (1, value.shape[0]):
            raise SparkGPTError(f"{self.path}: {scale_name} has {scale.numel()} values for {value.shape[0]} rows")
        return value.float() / scale.reshape(-1, *[1] * (value.dim() - 1))

    def scalar(self, name: str) -> int | float:
        info = self.info(name)
        if info.shape != ():
            raise SparkGPTError(f"{self.path}: at byte {info.offset}: {name} has shape {list(info.shape)}; "
                                "expected a single value")
        return self.tensor(name).item()


class _Cursor(BoundedReader):
    """CTranslate2's u32 counts and u16-length, NUL-terminated strings."""

    def count(self, what: str, min_bytes_each: int, fmt: str = "<I") -> int:
        return super().count(what, min_bytes_each, fmt)

    def string(self, what: str) -> str:
        start = self.pos
        length = self.unpack("<H", f"{what} length")
        if length == 0 or length > self.left:
            raise self.fail(f"{what} length {length} is {'zero' if length == 0 else 'past the end of the file'}",
                            at=start)
        raw = bytes(self.buffer[self.pos:self.pos + length])
        if raw[-1] != 0:
            raise self.fail(f"{what} does not end with a NUL byte", at=start)
        try:
            text = raw[:-1].decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(f"{what} is not valid UTF-8 ({error.reason})", at=start) from None
        self.pos += length
        return text


def read_ctranslate2(path: str | Path) -> CT2File:
    """Parse a model.bin (or a directory holding one); every size checked before anything is allocated."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise SparkGPTError(f"{path}: no such CTranslate2 model file")
    if path.stat().st_size == 0:
        raise SparkGPTError(f"{path}: at byte 0: empty file")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(path, memoryview(data))
    version = cursor.unpack("<I", "binary version")
    if version not in SUPPORTED_VERSIONS:
        raise cursor.fail(f"binary version {version} is not supported; expected one of {SUPPORTED_VERSIONS}", at=0)
    spec = cursor.string("spec name")
    revision = cursor.unpack("<I", "spec revision")
    n_variables = cursor.count("variable count", 8)  # each: name (>= 3), rank, dtype, byte count (>= 8 in all)
    variables: dict[str, CT2Variable] = {}
    for _ in range(n_variables):
        start = cursor.pos
        name = cursor.string("variable name")
        if name in variables:
            raise cursor.fail(f"variable {name!r} appears twice", at=start)
        rank = cursor.unpack("<B", f"rank of {name}")
        if rank > MAX_RANK:
            raise cursor.fail(f"variable {name}: rank {rank} exceeds {MAX_RANK}", at=cursor.pos - 1)
        shape = tuple(cursor.unpack("<I", f"dimension of {name}") for _ in range(rank))
        dtype_at = cursor.pos
        dtype_id = cursor.unpack("<B", f"dtype of {name}")
        if dtype_id not in DTYPES:
            raise cursor.fail(f"variable {name}: unknown dtype id {dtype_id}", at=dtype_at)
        size_at = cursor.pos
        n_bytes = cursor.unpack("<I", f"byte count of {name}")
        expected = math.prod(shape) * DTYPES[dtype_id][1].itemsize
        if n_bytes != expected:
            raise cursor.fail(f"variable {name}: {n_bytes} bytes for shape {list(shape)} of "
                              f"{DTYPES[dtype_id][0]} (expected {expected})", at=size_at)
        if n_bytes > cursor.left:
            raise cursor.fail(f"variable {name}: {n_bytes} bytes of data but only {cursor.left} are left "
                              "(truncated file?)", at=size_at)
        variables[name] = CT2Variable(name, shape, dtype_id, cursor.pos, n_bytes)
        cursor.pos += n_bytes
    n_aliases = cursor.count("alias count", 6)
    aliases: dict[str, str] = {}
    for _ in range(n_aliases):
        start = cursor.pos
        alias = cursor.string("alias name")
        target = cursor.string("aliased variable name")
        if target not in variables:
            raise cursor.fail(f"alias {alias!r} names {target!r}, which is not a variable", at=start)
        if alias in variables or alias in aliases:
            raise cursor.fail(f"alias {alias!r} is already a name", at=start)
        aliases[alias] = target
    if cursor.left:
        raise cursor.fail(f"{cursor.left} unexpected bytes after the last alias")
    return CT2File(path, version, spec, revision, variables, aliases, data)


# ---- Whisper's spec onto our model ---------------------------------------------------------------------------

WHISPER_SPEC = "WhisperSpec"
WHISPER_REVISION = 3
_GELU = 3  # CTranslate2's Activation.GELU (exact)
# Flags of the spec, and the value Whisper's math needs (None: any; head counts are read, alignment only steers
# word timestamps).
_FLAGS: dict[str, int | None] = {
    "encoder/num_heads": None, "decoder/num_heads": None, "decoder/activation": _GELU, "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0, "decoder/alibi": 0, "decoder/alibi_use_positive_positions": 0,
    "decoder/scale_alibi": 0, "decoder/start_from_zero_embedding": 0, "decoder/alignment_layer": None,
    "decoder/alignment_heads": None,
}
PROJECTION = "decoder/projection/weight"  # the output layer: an alias of the token embedding (tied)
_LINEAR = {"weight": "weight", "bias": "bias"}
_NORM = {"weight": "gamma", "bias": "beta"}


def _dims(file: CT2File, name: str, rank: int) -> tuple[int, ...]:
    info = file.info(name)
    if len(info.shape) != rank:
        raise SparkGPTError(f"{file.path}: at byte {info.offset}: {name} has shape {list(info.shape)}; expected "
                            f"{rank} dimensions")
    return info.shape


def _layers(file: CT2File, stack: str) -> int:
    count = 0
    while f"{stack}/layer_{count}/ffn/linear_0/weight" in file:
        count += 1
    return count


def whisper_config_from_ctranslate2(file: CT2File, settings: dict[str, Any],
                                    token_ids: dict[str, int | None]) -> WhisperConfig:
    """The config a Whisper model.bin implies: sizes from its shapes and head counts, the suppressed tokens from
    its config.json (`settings`), bos/eos from the tokenizer (`token_ids`)."""
    if file.spec != WHISPER_SPEC:
        raise SparkGPTError(f"{file.path}: spec {file.spec!r} is not supported; sparkgpt reads {WHISPER_SPEC}")
    if file.revision > WHISPER_REVISION:
        raise SparkGPTError(f"{file.path}: {WHISPER_SPEC} revision {file.revision} is newer than the "
                            f"{WHISPER_REVISION} sparkgpt reads")
    for name, wanted in _FLAGS.items():
        if wanted is not None and name in file and file.scalar(name) != wanted:
            raise SparkGPTError(f"{file.path}: at byte {file.info(name).offset}: {name} is {file.scalar(name)}; "
                                f"Whisper has {wanted}")
    heads = {int(file.scalar(f"{stack}/num_heads")) for stack in ("encoder", "decoder")}
    if len(heads) != 1:
        raise SparkGPTError(f"{file.path}: encoder and decoder head counts differ ({sorted(heads)})")
    vocab, d_model = _dims(file, "decoder/embeddings/weight", 2)
    conv1 = _dims(file, "encoder/conv1/weight", 3)
    sizes = dict(
        vocab_size=vocab, d_model=d_model, n_heads=heads.pop(), n_layers=_layers(file, "decoder"),
        n_encoder_layers=_layers(file, "encoder"), d_ff=_dims(file, "decoder/layer_0/ffn/linear_0/weight", 2)[0],
        max_seq_len=_dims(file, "decoder/position_encodings/encodings", 2)[0],
        n_audio_ctx=_dims(file, "encoder/position_encodings/encodings", 2)[0], n_mels=conv1[1],
    )
    try:
        return whisper_config(
            **sizes, suppress_tokens=list(settings.get("suppress_ids") or []),
            begin_suppress_tokens=list(settings.get("suppress_ids_begin") or []),
            bos_token_id=token_ids.get("<|startoftranscript|>"), eos_token_id=token_ids.get("<|endoftext|>"),
        )
    except SparkGPTError as error:
        raise SparkGPTError(f"{file.path}: {error}") from None


# A block's layers, ours -> theirs (a decoder block adds the cross-attention's); q/k/v are fused in theirs.
_BLOCK_NORMS = {"attn_norm": "self_attention/layer_norm", "ffn_norm": "ffn/layer_norm"}
_BLOCK_LINEARS = {"attn.o_proj": "self_attention/linear_1", "ffn.up_proj": "ffn/linear_0",
                  "ffn.down_proj": "ffn/linear_1"}
_CROSS_NORMS = {"cross_norm": "attention/layer_norm"}
_CROSS_LINEARS = {"cross_attn.q_proj": "attention/linear_0", "cross_attn.o_proj": "attention/linear_2"}


def _block_names(ours: str, theirs: str, cross: bool) -> dict[str, str]:
    norms = {**_BLOCK_NORMS, **(_CROSS_NORMS if cross else {})}
    linears = {**_BLOCK_LINEARS, **(_CROSS_LINEARS if cross else {})}
    names = {f"{ours}.{a}.{k}": f"{theirs}/{b}/{v}" for a, b in norms.items() for k, v in _NORM.items()}
    names.update({f"{ours}.{a}.{k}": f"{theirs}/{b}/{v}" for a, b in linears.items() for k, v in _LINEAR.items()})
    return names


def whisper_tensor_names(config: WhisperConfig) -> dict[str, str]:
    """Our name -> CTranslate2's, for every tensor that maps one to one (the fused projections are split apart)."""
    names = {
        "conv1.weight": "encoder/conv1/weight", "conv1.bias": "encoder/conv1/bias",
        "conv2.weight": "encoder/conv2/weight", "conv2.bias": "encoder/conv2/bias",
        "audio_positions": "encoder/position_encodings/encodings",
        "encoder_norm.weight": "encoder/layer_norm/gamma", "encoder_norm.bias": "encoder/layer_norm/beta",
        "embeddings.token_embedding.weight": "decoder/embeddings/weight",
        "embeddings.position_embedding.weight": "decoder/position_encodings/encodings",
        "final_norm.weight": "decoder/layer_norm/gamma", "final_norm.bias": "decoder/layer_norm/beta",
    }
    for i in range(config.n_encoder_layers):
        names.update(_block_names(f"encoder_blocks.{i}", f"encoder/layer_{i}", cross=False))
    for i in range(config.n_layers):
        names.update(_block_names(f"blocks.{i}", f"decoder/layer_{i}", cross=True))
    return names


def whisper_state_dict(file: CT2File, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Our Whisper's state dict (float32) from the file's variables. Every variable is used or is a known flag."""
    used = set(_FLAGS) | {PROJECTION}
    state = {}
    for ours, theirs in whisper_tensor_names(config).items():
        state[ours] = file.weight(theirs)
        used.add(theirs)
    if PROJECTION in file.variables and not torch.equal(file.weight(PROJECTION),
                                                        state["embeddings.token_embedding.weight"]):
        raise SparkGPTError(f"{file.path}: at byte {file.info(PROJECTION).offset}: {PROJECTION} differs from the "
                            "token embedding; sparkgpt's Whisper ties them")
    fused = [(f"encoder_blocks.{i}.attn", f"encoder/layer_{i}/self_attention/linear_0", ("q", "k", "v"))
             for i in range(config.n_encoder_layers)]
    for i in range(config.n_layers):
        fused.append((f"blocks.{i}.attn", f"decoder/layer_{i}/self_attention/linear_0", ("q", "k", "v")))
        fused.append((f"blocks.{i}.cross_attn", f"decoder/layer_{i}/attention/linear_1", ("k", "v")))
    for ours, theirs, parts in fused:
        for kind in ("weight", "bias"):
            rows = _dims(file, f"{theirs}/{kind}", 2 if kind == "weight" else 1)[0]
            value = file.weight(f"{theirs}/{kind}")
            if rows % len(parts):
                raise SparkGPTError(f"{file.path}: {theirs}/{kind} has {rows} rows, not {len(parts)} "
                                    "equal projections")
            for part, chunk in zip(parts, value.chunk(len(parts)), strict=True):
                state[f"{ours}.{part}_proj.{kind}"] = chunk
            used.add(f"{theirs}/{kind}")
    used |= {name + "_scale" for name in used}
    unexpected = sorted(set(file.variables) - used)
    if unexpected:
        raise SparkGPTError(f"{file.path}: unexpected variable(s) {', '.join(unexpected[:5])} for {WHISPER_SPEC}")
    return state
