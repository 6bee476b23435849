"""GGUF files (llama.cpp's format): a careful parser, dequantisation, and the `llama` architecture onto our GPT.

A GGUF file is, all little-endian:

    magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
    kv_count × (key: string, value_type u32, value)                  the metadata
    tensor_count × (name: string, n_dims u32, dims u64 × n_dims, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32), then the data section; each tensor's offset is relative to it

where a string is a u64 length and that many UTF-8 bytes, and an array is an element type u32, a u64 count and
the elements. GGUF lists dims fastest-varying first (dims[0] is the row length), so torch's shape is dims reversed.

Every count and length is checked against the bytes the file has left before anything is allocated, so a corrupt
or hostile file gives a one-line SparkGPTError naming the file and the byte offset, never a huge allocation.
The file is memory-mapped: opening it reads only the header, and a tensor's bytes are read when it is asked for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkgpt.checkpoint.binary import BoundedReader
from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.model.quant import GROUP_SIZE, layer_method, pack_nibbles, quantize_model
from sparkgpt.model.transformer import GPT

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 8  # arrays of arrays are legal; bound the recursion a hostile file could ask for

# ---- metadata value types ---------------------------------------------------------------------------------

STRING, ARRAY, BOOL = 8, 9, 7
UINT32, INT32, FLOAT32 = 4, 5, 6
# value type -> (name, numpy dtype); bool is one byte that must be 0 or 1.
_SCALAR_TYPES: dict[int, tuple[str, str]] = {
    0: ("uint8", "<u1"), 1: ("int8", "<i1"), 2: ("uint16", "<u2"), 3: ("int16", "<i2"),
    4: ("uint32", "<u4"), 5: ("int32", "<i4"), 6: ("float32", "<f4"), 7: ("bool", "<u1"),
    10: ("uint64", "<u8"), 11: ("int64", "<i8"), 12: ("float64", "<f8"),
}

# ---- tensor types -----------------------------------------------------------------------------------------

# ggml type id -> (name, elements per block, bytes per block): every type llama.cpp defines, so a file using
# one we cannot dequantise still opens (its raw bytes are readable); `dequantize` names the ones it supports.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 14, 30
Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS = 6, 7, 10, 11, 13, 20, 23

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF's dims reversed
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset of the tensor's data in the file
    n_bytes: int


class GGUFFile:
    """A parsed GGUF file: its metadata, its tensor table, and its bytes memory-mapped (read on demand)."""

    def __init__(self, path: Path, version: int, alignment: int, metadata: dict[str, Any],
                 tensors: dict[str, GGUFTensor], data: np.ndarray, value_offsets: dict[str, int]) -> None:
        self.path = path
        self.version = version
        self.alignment = alignment
        self.metadata = metadata
        self.tensors = tensors
        self.value_offsets = value_offsets  # metadata key -> byte offset of its value, for error messages
        self._data = data  # np.memmap of the whole file, uint8

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, " \
               f"{len(self.tensors)} tensors)"

    def _info(self, name: str) -> GGUFTensor:
        if name not in self.tensors:
            raise SparkGPTError(f"{self.path}: no tensor named {name!r}")
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as uint8: a view of the memory map, nothing copied."""
        info = self._info(name)
        return self._data[info.offset:info.offset + info.n_bytes]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantised to float32 (then cast to `dtype`), in torch's dimension order."""
        info = self._info(name)
        try:
            values = dequantize(self.raw(name), info.ggml_type, info.shape)
        except SparkGPTError as error:
            raise SparkGPTError(f"{self.path}: at byte {info.offset}: tensor {name}: {error}") from None
        return values.to(dtype)


# ---- parsing ----------------------------------------------------------------------------------------------

class _Reader(BoundedReader):
    """GGUF's little-endian scalars, u64 counts and u64-length strings."""

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def count(self, what: str, min_bytes_each: int, fmt: str = "<Q") -> int:
        return super().count(what, min_bytes_each, fmt)

    def string(self, what: str = "string") -> str:
        start = self.pos
        length = self.u64(f"{what} length")
        if length > self.left:
            raise self.fail(f"{what} length {length} exceeds the {self.left} bytes left", at=start)
        raw = self.buffer[self.pos:self.pos + length]
        try:
            text = str(raw, "utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(f"{what} is not valid UTF-8 ({error.reason} at byte {start + 8 + error.start})",
                            at=start) from None
        self.pos += length
        return text


def _read_scalar(reader: _Reader, value_type: int) -> Any:
    type_name, dtype = _SCALAR_TYPES[value_type]
    size = np.dtype(dtype).itemsize
    reader.need(size, type_name)
    value = np.frombuffer(reader.buffer, dtype=dtype, count=1, offset=reader.pos)[0].item()  # a Python number
    if value_type == BOOL and value not in (0, 1):
        raise reader.fail(f"bool value {value}; expected 0 or 1")
    reader.pos += size
    return bool(value) if value_type == BOOL else value


def _read_array(reader: _Reader, depth: int) -> list[Any]:
    type_at = reader.pos
    element_type = reader.u32("array element type")
    if element_type in _SCALAR_TYPES:
        # Fixed-size elements: one bounds check, one vectorised read.
        dtype = np.dtype(_SCALAR_TYPES[element_type][1])
        n = reader.count("array length", dtype.itemsize)
        values = np.frombuffer(reader.buffer, dtype=dtype, count=n, offset=reader.pos)
        if element_type == BOOL and n and values.max() > 1:
            bad = int(np.argmax(values > 1))
            raise reader.fail(f"bool value {values[bad]}; expected 0 or 1", at=reader.pos + bad)
        reader.pos += n * dtype.itemsize
        return values.astype(bool).tolist() if element_type == BOOL else values.tolist()
    if element_type == STRING:
        n = reader.count("array length", 8)  # each string is at least its u64 length
        return [reader.string("array string") for _ in range(n)]
    if element_type == ARRAY:
        if depth >= MAX_ARRAY_NESTING:
            raise reader.fail(f"arrays nested deeper than {MAX_ARRAY_NESTING} levels", at=type_at)
        n = reader.count("array length", 12)  # each inner array is at least its type and count
        return [_read_array(reader, depth + 1) for _ in range(n)]
    raise reader.fail(f"unknown array element type {element_type}", at=type_at)


def _read_value(reader: _Reader, value_type: int, type_at: int) -> Any:
    if value_type in _SCALAR_TYPES:
        return _read_scalar(reader, value_type)
    if value_type == STRING:
        return reader.string()
    if value_type == ARRAY:
        return _read_array(reader, depth=1)
    raise reader.fail(f"unknown metadata value type {value_type}", at=type_at)


def _read_header(reader: _Reader) -> tuple[int, int, int]:
    reader.need(4, "magic")
    magic = bytes(reader.buffer[:4])
    if magic != MAGIC:
        raise reader.fail(f"not a GGUF file (magic {magic!r}; expected {MAGIC!r})")
    reader.pos = 4
    version = reader.u32("version")
    if version not in SUPPORTED_VERSIONS:
        byte_swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file?)" if byte_swapped in SUPPORTED_VERSIONS else ""
        raise reader.fail(f"GGUF version {version} is not supported{hint}; expected 2 or 3", at=4)
    # Each tensor info is at least name length + n_dims + type + offset; each key/value at least
    # key length + value type + a one-byte value.
    n_tensors = reader.count("tensor count", 24)
    n_kv = reader.count("metadata key/value count", 13)
    return version, n_tensors, n_kv


def _read_metadata(reader: _Reader, n_kv: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The key/value pairs, and the byte offset of each value (for errors found later)."""
    metadata: dict[str, Any] = {}
    offsets: dict[str, int] = {}
    for _ in range(n_kv):
        key_at = reader.pos
        key = reader.string("metadata key")
        if key in metadata:
            raise reader.fail(f"duplicate metadata key {key!r}", at=key_at)
        type_at = reader.pos
        value_type = reader.u32("metadata value type")
        offsets[key] = reader.pos
        metadata[key] = _read_value(reader, value_type, type_at)
    return metadata, offsets


def _alignment(reader: _Reader, metadata: dict[str, Any], offsets: dict[str, int]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise reader.fail(f"general.alignment {alignment!r} is not a power of two", at=offsets["general.alignment"])
    return alignment


def _read_tensor_info(reader: _Reader) -> tuple[str, tuple[int, ...], int, int, int]:
    """(name, GGUF dims, ggml type, offset relative to the data section, byte offset of this entry)."""
    entry_at = reader.pos
    name = reader.string("tensor name")
    dims_at = reader.pos
    n_dims = reader.u32("tensor n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise reader.fail(f"tensor {name}: {n_dims} dims; expected 1 to {MAX_DIMS}", at=dims_at)
    reader.need(8 * n_dims, f"tensor {name} dims")
    dims = struct.unpack_from(f"<{n_dims}q", reader.buffer, reader.pos)
    if any(d <= 0 for d in dims):
        raise reader.fail(f"tensor {name}: dims {list(dims)} must all be positive")
    reader.pos += 8 * n_dims
    type_at = reader.pos
    ggml_type = reader.u32(f"tensor {name} type")
    if ggml_type not in GGML_TYPES:
        raise reader.fail(f"tensor {name}: unknown ggml type {ggml_type}", at=type_at)
    offset = reader.u64(f"tensor {name} offset")
    return name, dims, ggml_type, offset, entry_at


def _tensor_bytes(reader: _Reader, name: str, dims: tuple[int, ...], ggml_type: int, at: int) -> int:
    type_name, block_size, type_size = GGML_TYPES[ggml_type]
    n_elements = 1
    for d in dims:
        n_elements *= d
        if n_elements > _INT64_MAX:
            raise reader.fail(f"tensor {name}: dims {list(dims)} overflow a 64-bit element count", at=at)
    if dims[0] % block_size:
        raise reader.fail(f"tensor {name}: row length {dims[0]} is not a multiple of {type_name}'s block size "
                          f"{block_size}", at=at)
    return n_elements // block_size * type_size


def _read_tensors(reader: _Reader, n_tensors: int, alignment: int) -> dict[str, GGUFTensor]:
    entries = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name, dims, ggml_type, offset, at = _read_tensor_info(reader)
        if name in names:
            raise reader.fail(f"duplicate tensor name {name!r}", at=at)
        names.add(name)
        entries.append((name, dims, ggml_type, offset, at, _tensor_bytes(reader, name, dims, ggml_type, at)))
    data_start = reader.pos + (-reader.pos % alignment)
    tensors: dict[str, GGUFTensor] = {}
    end_of_previous = 0  # relative to the data section
    for name, dims, ggml_type, offset, at, n_bytes in entries:
        if offset % alignment:
            raise reader.fail(f"tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}",
                              at=at)
        if offset < end_of_previous:
            raise reader.fail(f"tensor {name}: data offset {offset} overlaps or precedes the previous tensor's data "
                              f"(which ends at {end_of_previous})", at=at)
        start = data_start + offset
        if start + n_bytes > reader.size:
            raise reader.fail(f"tensor {name}: its {n_bytes} bytes at byte {start} run past the end of the file "
                              f"({reader.size} bytes)", at=at)
        type_name = GGML_TYPES[ggml_type][0]
        tensors[name] = GGUFTensor(name, tuple(reversed(dims)), ggml_type, type_name, start, n_bytes)
        end_of_previous = offset + n_bytes
    return tensors


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; tensor data stays on disk until asked for."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise SparkGPTError(f"{path}: at byte 0: the file is empty; expected a GGUF header")
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise SparkGPTError(f"{path}: file not found") from None
    except (OSError, ValueError) as error:
        raise SparkGPTError(f"{path}: cannot read ({error})") from None
    reader = _Reader(path, memoryview(data))
    version, n_tensors, n_kv = _read_header(reader)
    metadata, value_offsets = _read_metadata(reader, n_kv)
    alignment = _alignment(reader, metadata, value_offsets)
    tensors = _read_tensors(reader, n_tensors, alignment)
    return GGUFFile(path, version, alignment, metadata, tensors, data, value_offsets)


# ---- dequantisation ---------------------------------------------------------------------------------------
#
# Each function takes the tensor's bytes as blocks [n_blocks, bytes per block] and returns float32 values
# [n_blocks, elements per block]. The arithmetic is done in float32 in the same order as ggml's reference
# (d · q + m, not a fused multiply-add), so results match llama.cpp's and the gguf package's bit for bit.

def _f16(column: np.ndarray) -> np.ndarray:
    """Two bytes per block -> that block's float16 scale as float32 [n_blocks, 1]."""
    return column.view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray, group: int) -> np.ndarray:
    """4-bit values, two per byte: each run of `group` bytes holds `group` low nibbles, then `group` high ones."""
    runs = packed.reshape(packed.shape[0], -1, 1, group)
    return np.concatenate([runs & 0x0F, runs >> 4], axis=2).reshape(packed.shape[0], -1)


def _dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view("<f4").astype(np.float32, copy=True)


def _dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view("<f2").astype(np.float32)


def _dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift its 16 bits up."""
    return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0, 34 bytes per 32 values: scale d (f16), then 32 int8 q. x = d · q."""
    d = _f16(blocks[:, :2])
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return q * d


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0, 18 bytes per 32 values: scale d (f16), then 16 bytes of 4-bit q. x = d · (q - 8)."""
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:], 16).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1, 20 bytes per 32 values: scale d (f16), minimum m (f16), then 16 bytes of 4-bit q. x = d · q + m."""
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:], 16).astype(np.float32)
    return d * q + m


def _k_quant_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of eight 6-bit scales and eight 6-bit minimums (one pair per 32-value sub-block).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 minimums 0-3; sub-blocks 4-7 take their low 4 bits
    from bytes 8-11 (scale in the low nibble, minimum in the high) and their top 2 bits from the top 2 bits of
    bytes 0-3 (scales) and 4-7 (minimums).
    """
    low_scales, low_mins, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low_scales & 0x3F, (rest & 0x0F) | ((low_scales >> 2) & 0x30)], axis=1)
    mins = np.concatenate([low_mins & 0x3F, (rest >> 4) | ((low_mins >> 2) & 0x30)], axis=1)
    return scales, mins


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K, 144 bytes per 256 values in 8 sub-blocks of 32: d (f16), dmin (f16), 12 bytes of 6-bit sub-block
    scales and minimums, 128 bytes of 4-bit q. x = (d · scale) · q - (dmin · min)."""
    n_blocks = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    scales, mins = _k_quant_scales(blocks[:, 4:16])
    sub_scale = (d * scales.astype(np.float32))[:, :, None]
    sub_min = (dmin * mins.astype(np.float32))[:, :, None]
    q = _nibbles(blocks[:, 16:], 32).astype(np.float32).reshape(n_blocks, 8, 32)
    return (sub_scale * q - sub_min).reshape(n_blocks, 256)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K, 210 bytes per 256 values in 16 sub-blocks of 16: 128 bytes of low 4 bits, 64 bytes of high 2 bits,
    16 int8 sub-block scales, d (f16). x = (d · scale) · (q - 32) with q = low | high << 4."""
    n_blocks = blocks.shape[0]
    low = _nibbles(blocks[:, :128], 64)  # 256 values: each half of the block is 64 bytes of low nibbles
    high_bytes = blocks[:, 128:192].reshape(n_blocks, 2, 1, 32)  # each byte holds 4 values' high 2 bits
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = ((high_bytes >> shifts) & 0x03).reshape(n_blocks, 256)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sub_scale = (_f16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]
    return (sub_scale * q.reshape(n_blocks, 16, 16).astype(np.float32)).reshape(n_blocks, 256)


def _high_bits(packed: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32-bit field of fifth bits: bit j is value j's -> [n_blocks, 32] of 0 or 16."""
    words = packed.copy().view("<u4")  # [n_blocks, 1]
    return (((words >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0, 22 bytes per 32 values: d (f16), 4 bytes of fifth bits, 16 bytes of low nibbles. x = d · (q - 16)."""
    d = _f16(blocks[:, :2])
    q = (_nibbles(blocks[:, 6:], 16) | _high_bits(blocks[:, 2:6])).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def _dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """Q5_1, 24 bytes per 32 values: d (f16), m (f16), 4 bytes of fifth bits, 16 bytes of low nibbles.
    x = d · q + m."""
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = (_nibbles(blocks[:, 8:], 16) | _high_bits(blocks[:, 4:8])).astype(np.float32)
    return d * q + m


def _crumbs(packed: np.ndarray) -> np.ndarray:
    """2-bit values, four per byte: each 32-byte half of `packed` holds 128 values, 32 at each shift 0, 2, 4, 6
    -> [n_blocks, halves, 4 shifts, 32]."""
    halves = packed.reshape(packed.shape[0], -1, 1, 32)
    return (halves >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03


def _dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """Q2_K, 84 bytes per 256 values in 16 sub-blocks of 16: 16 bytes of 4-bit scale (low) and minimum (high), 64
    bytes of 2-bit q, d (f16), dmin (f16). x = (d · scale) · q - (dmin · min)."""
    n_blocks = blocks.shape[0]
    packed = blocks[:, :16]
    sub_scale = (_f16(blocks[:, 80:82]) * (packed & 0x0F).astype(np.float32))[:, :, None]
    sub_min = (_f16(blocks[:, 82:84]) * (packed >> 4).astype(np.float32))[:, :, None]
    q = _crumbs(blocks[:, 16:80]).astype(np.float32).reshape(n_blocks, 16, 16)
    return (sub_scale * q - sub_min).reshape(n_blocks, 256)


def _dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """Q3_K, 110 bytes per 256 values in 16 sub-blocks of 16: 32 bytes of third bits (bit b of byte l belongs to
    the b-th run of 32 values), 64 bytes of 2-bit q, 12 bytes of 6-bit signed scales, d (f16).
    x = (d · (scale - 32)) · (q - 4 · (1 - third bit)).

    Scale i takes its low 4 bits from byte i % 8 (low nibble for i < 8, high for the rest) and its top 2 bits from
    byte 8 + i % 4, at bit 2 · (i // 4)."""
    n_blocks = blocks.shape[0]
    packed = blocks[:, 96:108]
    index = np.arange(16)
    low = (packed[:, index % 8] >> (4 * (index // 8)).astype(np.uint8)) & 0x0F
    high = (packed[:, 8 + index % 4] >> (2 * (index // 4)).astype(np.uint8)) & 0x03
    scales = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sub_scale = (_f16(blocks[:, 108:110]) * scales.astype(np.float32))[:, :, None]
    third = ((blocks[:, None, :32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(n_blocks, 2, 4, 32)
    q = _crumbs(blocks[:, 32:96]).astype(np.int8) - ((1 - third) << 2).astype(np.int8)
    return (sub_scale * q.astype(np.float32).reshape(n_blocks, 16, 16)).reshape(n_blocks, 256)


def _dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """Q5_K, 176 bytes per 256 values in 8 sub-blocks of 32: d (f16), dmin (f16), Q4_K's 12 bytes of scales and
    minimums, 32 bytes of fifth bits (bit b of byte l: value l of sub-block b), 128 bytes of low nibbles.
    x = (d · scale) · q - (dmin · min)."""
    n_blocks = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    scales, mins = _k_quant_scales(blocks[:, 4:16])
    sub_scale = (d * scales.astype(np.float32))[:, :, None]
    sub_min = (dmin * mins.astype(np.float32))[:, :, None]
    fifth = ((blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4  # [n, 8, 32]
    q = (_nibbles(blocks[:, 48:], 32).reshape(n_blocks, 8, 32) | fifth).astype(np.float32)
    return (sub_scale * q - sub_min).reshape(n_blocks, 256)


# The 16 non-uniform levels of IQ4_NL and IQ4_XS (ggml's kvalues_iq4nl), denser near zero as weights are.
_IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    """IQ4_NL, 18 bytes per 32 values: d (f16), 16 bytes of 4-bit level indices. x = d · level[q]."""
    return _f16(blocks[:, :2]) * _IQ4_LEVELS[_nibbles(blocks[:, 2:], 16)]


def _dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    """IQ4_XS, 136 bytes per 256 values in 8 sub-blocks of 32: d (f16), 2 bytes of the scales' top 2 bits, 4 bytes
    of their low nibbles, 128 bytes of level indices. x = (d · (scale - 32)) · level[q]."""
    n_blocks = blocks.shape[0]
    index = np.arange(8)
    top = (blocks[:, 2:4].copy().view("<u2") >> (2 * index).astype(np.uint16)) & 0x03  # [n, 8]
    low = (blocks[:, 4 + index // 2] >> (4 * (index % 2)).astype(np.uint8)) & 0x0F
    scales = (low.astype(np.int16) | (top.astype(np.int16) << 4)) - 32
    sub_scale = (_f16(blocks[:, :2]) * scales.astype(np.float32))[:, :, None]
    levels = _IQ4_LEVELS[_nibbles(blocks[:, 8:], 16)].reshape(n_blocks, 8, 32)
    return (sub_scale * levels).reshape(n_blocks, 256)


_DEQUANTIZERS = {
    F32: _dequantize_f32, F16: _dequantize_f16, BF16: _dequantize_bf16, Q8_0: _dequantize_q8_0,
    Q4_0: _dequantize_q4_0, Q4_1: _dequantize_q4_1, Q5_0: _dequantize_q5_0, Q5_1: _dequantize_q5_1,
    Q2_K: _dequantize_q2_k, Q3_K: _dequantize_q3_k, Q4_K: _dequantize_q4_k, Q5_K: _dequantize_q5_k,
    Q6_K: _dequantize_q6_k, IQ4_NL: _dequantize_iq4_nl, IQ4_XS: _dequantize_iq4_xs,
}


def dequantize(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor's raw bytes (uint8) of the given ggml type -> float32 torch tensor of `shape` (torch order)."""
    if ggml_type not in _DEQUANTIZERS:
        name = GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else f"unknown type {ggml_type}"
        supported = ", ".join(GGML_TYPES[t][0] for t in _DEQUANTIZERS)
        raise SparkGPTError(f"cannot dequantise {name} (supported: {supported})")
    type_name, block_size, type_size = GGML_TYPES[ggml_type]
    shape = tuple(int(d) for d in shape)
    n_elements = int(np.prod(shape, dtype=object))
    if not shape or shape[-1] % block_size:
        raise SparkGPTError(f"{type_name} shape {shape}: the row length must be a multiple of {block_size}")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != n_elements // block_size * type_size:
        raise SparkGPTError(f"{type_name} shape {shape} needs {n_elements // block_size * type_size} bytes; "
                            f"got {raw.size}")
    values = _DEQUANTIZERS[ggml_type](raw.reshape(-1, type_size))
    return torch.from_numpy(values.reshape(shape))


# ---- the llama architecture -------------------------------------------------------------------------------

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
# ggml rotates adjacent pairs for these (rope type "norm"), so llama.cpp's converter reorders their Q/K rows; the
# others (Qwen2, Qwen3, Gemma 2 and 3: rope type "neox") rotate halves, as transformers does, and are stored
# as they are.
_INTERLEAVED_ROPE = ("llama",)

# Inside blk.N (GGUF) -> inside blocks.N (ours).
_LLAMA_BLOCK_TENSORS = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "ffn.gate_proj.weight",
    "ffn_up.weight": "ffn.up_proj.weight",
    "ffn_down.weight": "ffn.down_proj.weight",
}
# Gemma 2 and 3's sandwich norms. llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w: our g as it is.
_GEMMA_BLOCK_TENSORS = {"post_attention_norm.weight": "attn_post_norm.weight",
                         "post_ffw_norm.weight": "ffn_post_norm.weight"}
# What llama.cpp fixes in code for gemma3 files rather than in metadata: one global layer in six, and the rope base
# of the sliding-window layers.
_GEMMA3_GLOBAL_EVERY = 6
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0
# What llama.cpp's gemma2 assumes when a file omits it (in the order gguf_model_config unpacks them): one global
# layer in two, Gemma 2's window and its caps of attention scores and of logits.
GEMMA2_DEFAULTS = {"attention.sliding_window_pattern": 2, "attention.sliding_window": 4096,
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
# llama.cpp's gemma2 scales scores by head_dim^-1/2, except in the 46-layer 27B, whose query_pre_attn_scalar
# is d_model / n_heads (it reads no such key, so the layer count is what tells them apart).
GEMMA2_27B_LAYERS = 46


def gemma2_query_pre_attn_scalar(n_layers: int, d_model: int, n_heads: int, head_dim: int) -> float:
    """The query_pre_attn_scalar llama.cpp's gemma2 applies (scores × its ^-1/2) for a model of this shape."""
    return d_model / n_heads if n_layers == GEMMA2_27B_LAYERS else float(head_dim)


def _architecture(gguf: GGUFFile) -> str:
    architecture = gguf.metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise SparkGPTError(f"{gguf.path}: architecture {architecture!r} is not supported; "
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return architecture


_REQUIRED = object()


def _metadata_number(gguf: GGUFFile, key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """A metadata value that must be an int (or, for kind=float, any number); `default` when absent."""
    if key not in gguf.metadata:
        if default is _REQUIRED:
            raise SparkGPTError(f"{gguf.path}: missing metadata key {key!r}")
        return default
    value = gguf.metadata[key]
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        expected = "an integer" if kind is int else "a number"
        raise SparkGPTError(f"{gguf.path}: at byte {gguf.value_offsets[key]}: metadata {key} is {value!r}; "
                            f"expected {expected}")
    return kind(value)


def gguf_model_config(gguf: GGUFFile) -> ModelConfig:
    """Our ModelConfig from a `llama`, `qwen2`, `qwen3`, `gemma2` or `gemma3` GGUF file's metadata (and whether it
    stores a separate output matrix)."""
    arch = _architecture(gguf)

    def number(key: str, kind: type = int, default: Any = _REQUIRED) -> Any:
        return _metadata_number(gguf, f"{arch}.{key}", kind, default)

    if number("expert_count", default=0) > 0:
        raise SparkGPTError(f"{gguf.path}: mixture-of-experts {arch} models are not supported")
    scaling = gguf.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise SparkGPTError(f"{gguf.path}: rope scaling {scaling!r} is not supported")
    d_model, n_heads = number("embedding_length"), number("attention.head_count")
    head_dim = number("attention.key_length", default=d_model // n_heads if n_heads > 0 else 0)
    for key in ("attention.value_length", "rope.dimension_count"):
        if number(key, default=head_dim) != head_dim:
            raise SparkGPTError(f"{gguf.path}: {arch}.{key} {number(key)} differs from the head width {head_dim}; "
                                "only full-width rotary attention is supported")
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    vocab_size = number("vocab_size", default=len(tokens) if isinstance(tokens, list) else None)
    if vocab_size is None and "token_embd.weight" in gguf.tensors:
        vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    special = {}
    for name in ("bos_token_id", "eos_token_id"):
        special[name] = _metadata_number(gguf, f"tokenizer.ggml.{name}", int, default=None)
    # Biases on q/k/v (Qwen2) and per-head q/k norms (Qwen3): the file says so by holding them.
    qkv_bias = "blk.0.attn_q.bias" in gguf.tensors
    family: dict[str, Any] = {"ffn": "swiglu"}
    if arch == "gemma3":
        n_layers = number("block_count")
        every = number("attention.sliding_window_pattern", default=_GEMMA3_GLOBAL_EVERY)
        family = dict(ffn="geglu", sandwich_norm=True, scale_embeddings=True, attention_scale=head_dim ** -0.5,
                      rope_local_theta=_GEMMA3_LOCAL_ROPE_THETA, attention_window=number("attention.sliding_window"),
                      attention_patterns=["dense" if (i + 1) % every == 0 else "local" for i in range(n_layers)])
    elif arch == "gemma2":
        n_layers, rope_theta = number("block_count"), number("rope.freq_base", float, default=10000.0)
        local_theta = number("rope.freq_base_swa", float, default=rope_theta)
        every, window, attn_cap, final_cap = (number(key, type(default), default)
                                              for key, default in GEMMA2_DEFAULTS.items())
        scalar = gemma2_query_pre_attn_scalar(n_layers, d_model, n_heads, head_dim)
        family = dict(ffn="geglu", sandwich_norm=True, scale_embeddings=True, attention_scale=scalar ** -0.5,
                      rope_local_theta=local_theta if local_theta != rope_theta else None, attention_window=window,
                      attention_patterns=["dense" if (i + 1) % every == 0 else "local" for i in range(n_layers)],
                      attn_logit_softcap=attn_cap, final_logit_softcap=final_cap)
    try:
        return ModelConfig(
            **family,
            qkv_bias=qkv_bias or None, qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors, vocab_size=vocab_size,
            n_layers=number("block_count"), n_heads=n_heads,
            n_kv_heads=number("attention.head_count_kv", default=n_heads), d_model=d_model,
            d_ff=number("feed_forward_length"), head_dim=head_dim, max_seq_len=number("context_length"),
            positions="rope", rope_theta=number("rope.freq_base", float, default=10000.0), norm="rmsnorm",
            norm_eps=number("attention.layer_norm_rms_epsilon", float), bias=False,
            tie_embeddings="output.weight" not in gguf.tensors, **special,
        )
    except SparkGPTError as error:
        raise SparkGPTError(f"{gguf.path}: {error}") from None


def llama_tensor_names(config: ModelConfig) -> dict[str, str]:
    """Our state-dict name -> the GGUF tensor name, for a llama (or qwen2) model of this shape."""
    names = {"token_embedding.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight"}
    for i in range(config.n_layers):
        for theirs, ours in _LLAMA_BLOCK_TENSORS.items():
            names[f"blocks.{i}.{ours}"] = f"blk.{i}.{theirs}"
        if config.qkv_bias:
            for short in ("q", "k", "v"):
                names[f"blocks.{i}.attn.{short}_proj.bias"] = f"blk.{i}.attn_{short}.bias"
        if config.qk_norm:
            for short in ("q", "k"):
                names[f"blocks.{i}.attn.{short}_norm.weight"] = f"blk.{i}.attn_{short}_norm.weight"
        if config.sandwich_norm:
            for theirs, ours in _GEMMA_BLOCK_TENSORS.items():
                names[f"blocks.{i}.{ours}"] = f"blk.{i}.{theirs}"
    if not config.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    return names


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of a Q or K projection's output rows.

    HF's Llama rotates each head's two halves (x_i, x_{i+d/2}) together; ggml's rope rotates adjacent pairs
    (x_{2i}, x_{2i+1}), so llama.cpp's converter reorders each head's rows from [first half; second half] into
    interleaved pairs. Reading them back as [head, pair i, member] and swapping the last two gives HF's order.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's reordering of a Q or K projection's output rows (the inverse of `unpermute_rope_rows`): each
    head's rows [first half; second half] become interleaved pairs, as ggml's rope rotates adjacent values."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _check_tensors(gguf: GGUFFile, names: dict[str, str], expected: dict[str, torch.Tensor]) -> None:
    wanted = set(names.values())
    missing = [name for name in names.values() if name not in gguf.tensors]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise SparkGPTError(f"{gguf.path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    unexpected = [name for name in gguf.tensors if name not in wanted]
    if unexpected:
        raise SparkGPTError(f"{gguf.path}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    for ours, theirs in names.items():
        info = gguf.tensors[theirs]
        if info.shape != tuple(expected[ours].shape):
            raise SparkGPTError(f"{gguf.path}: at byte {info.offset}: tensor {theirs} has shape {info.shape}; "
                                f"the metadata implies {tuple(expected[ours].shape)}")


def q4_as_int4(gguf: GGUFFile, name: str) -> dict[str, torch.Tensor]:
    """A Q4_0 or Q4_1 matrix as sparkgpt's int4 tensors (`sparkgpt.model.quant`), straight from its blocks: the
    same 32-value groups and 4-bit levels; the scale d and the zero (0 for Q4_0, m + 8d for Q4_1, as
    d · q + m = d · (q - 8) + (m + 8d)) rounded to bfloat16, the kernel's precision."""
    info = gguf._info(name)
    rows, cols = info.shape
    type_size, scale_bytes = GGML_TYPES[info.ggml_type][2], (2 if info.ggml_type == Q4_0 else 4)
    blocks = np.ascontiguousarray(gguf.raw(name)).reshape(-1, type_size)
    d = _f16(blocks[:, :2])
    zeros = np.zeros_like(d) if info.ggml_type == Q4_0 else _f16(blocks[:, 2:4]) + np.float32(8) * d
    levels = torch.from_numpy(_nibbles(blocks[:, scale_bytes:], 16)).view(rows, cols)
    groups = (rows, cols // GROUP_SIZE)
    return {"qweight": pack_nibbles(levels), "scales": torch.from_numpy(d).view(groups).bfloat16(),
            "zeros": torch.from_numpy(zeros).view(groups).bfloat16()}


# Under int4, these keep int8: their author gave them more than 4 bits (Q4_K_M files keep the most sensitive
# matrices at Q5/Q6/Q8), or levels a uniform 4-bit grid does not hold (IQ4's non-uniform ones).
_INT8_UNDER_INT4 = (F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q5_K, Q6_K, IQ4_NL, IQ4_XS)


def q4_k_as_int4(gguf: GGUFFile, name: str) -> dict[str, torch.Tensor]:
    """A Q4_K matrix as sparkgpt's int4 tensors, straight from its blocks: each 32-value sub-block is one group,
    x = (d · scale) · q - dmin · min = s · (q - 8) + (8s - dmin · min) with s = d · scale, rounded to bfloat16."""
    info = gguf._info(name)
    rows, cols = info.shape
    blocks = np.ascontiguousarray(gguf.raw(name)).reshape(-1, GGML_TYPES[Q4_K][2])
    scales, mins = _k_quant_scales(blocks[:, 4:16])
    step = _f16(blocks[:, 0:2]) * scales.astype(np.float32)  # [n_blocks, 8]
    zeros = np.float32(8) * step - _f16(blocks[:, 2:4]) * mins.astype(np.float32)
    levels = torch.from_numpy(_nibbles(blocks[:, 16:], 32)).view(rows, cols)
    groups = (rows, cols // GROUP_SIZE)
    return {"qweight": pack_nibbles(levels), "scales": torch.from_numpy(step).view(groups).bfloat16(),
            "zeros": torch.from_numpy(zeros).view(groups).bfloat16()}


def load_gguf_model(
    source: str | Path | GGUFFile, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    quantize: str | None = None,
):
    """Build our GPT from a llama-, qwen2-, qwen3-, gemma2- or gemma3-architecture GGUF file, every tensor dequantised
    and cast to `dtype`; or, with `quantize` ("int8"/"int4"), quantised (`sparkgpt.model.quant`): under int4,
    Q4_0/Q4_1/Q4_K matrices keep their own 4-bit levels and groups (no float round trip), those stored with more
    bits become int8 (`_INT8_UNDER_INT4`), everything else is dequantised, then quantised."""
    gguf = source if isinstance(source, GGUFFile) else read_gguf(source)
    config = gguf_model_config(gguf)
    interleaved = gguf.metadata["general.architecture"] in _INTERLEAVED_ROPE
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    names = llama_tensor_names(config)
    _check_tensors(gguf, names, expected)
    state, prequantized, int8_layers = {}, {}, set()
    for ours, theirs in names.items():
        layer, ggml_type = ours.removesuffix(".weight"), gguf.tensors[theirs].ggml_type
        fits = quantize == "int4" and layer.startswith("blocks.") and expected[ours].dim() == 2 \
            and layer_method(layer, quantize, tuple(expected[ours].shape)) == "int4"
        if fits and ggml_type in _INT8_UNDER_INT4:
            int8_layers.add(layer)
        direct = fits and ggml_type in (Q4_0, Q4_1, Q4_K)
        weight = (q4_k_as_int4 if ggml_type == Q4_K else q4_as_int4)(gguf, theirs) if direct \
            else {"weight": gguf.tensor(theirs)}
        if interleaved and ours.endswith("attn.q_proj.weight"):
            weight = {key: unpermute_rope_rows(t, config.n_heads) for key, t in weight.items()}
        elif interleaved and ours.endswith("attn.k_proj.weight"):
            weight = {key: unpermute_rope_rows(t, config.n_kv_heads) for key, t in weight.items()}
        if direct:
            prequantized[layer] = {key: t.to(device) for key, t in weight.items()}
            state[ours] = torch.empty(expected[ours].shape, device="meta")  # never read: the layer is replaced
        else:
            state[ours] = weight["weight"].to(device=device, dtype=dtype)
    model = GPT.from_state_dict(config, state)
    return quantize_model(model, quantize, prequantized=prequantized, int8_layers=int8_layers) if quantize else model
