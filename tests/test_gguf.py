"""The GGUF reader against references: the gguf package (writer, reader, dequantisation) and transformers.

Dequantisation equals `gguf.quants.dequantize` bit for bit; files written by `gguf.GGUFWriter` read back as written
and as `gguf.GGUFReader` reads them; corrupt files always give a one-line SparkGPTError naming the file and byte;
the real SmolLM2-135M Q4_1 file loads with logits within 1e-4 of transformers' own reading of it.
"""

from __future__ import annotations

import math
import random
import re
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from sparkgpt.checkpoint import families
from sparkgpt.checkpoint.gguf import (
    GGUFFile,
    dequantize,
    gguf_model_config,
    load_gguf_model,
    read_gguf,
)
from sparkgpt.errors import SparkGPTError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def bits(array) -> np.ndarray:
    """float32 values as their bit patterns, so equality is exact (NaN payloads and -0.0 included)."""
    array = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


# ---- dequantisation against gguf.quants ----------------------------------------------------------------------

QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
ALL_TYPES = [*QUANTIZABLE, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]
# Where each block type keeps its float16 scales (byte offsets in the block): random bytes there stay finite.
F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(48, 96), (2, 3, 64), (64,)], ids=str)
def test_dequantize_equals_gguf_on_tensors_it_quantised(qtype, shape):
    # Non-square and 3-d shapes pin the dimension order: rows are the last (fastest) dimension.
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    quantised = gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(quantised, qtype)
    actual = dequantize(np.ascontiguousarray(quantised).view(np.uint8).reshape(-1), qtype, shape)
    assert actual.dtype == torch.float32 and tuple(actual.shape) == shape == expected.shape
    np.testing.assert_array_equal(bits(actual), bits(expected))


def random_blocks(qtype, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes for `n_blocks` blocks of `qtype`, with every float16 scale a finite random value."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in F16_FIELDS.get(qtype, ()):
        scales = (rng.standard_normal(n_blocks) * 0.1).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_on_random_blocks(qtype):
    # Every bit pattern of the quantised values (and of F32/F16/BF16 values: NaNs, infinities, subnormals).
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    rows, row_length = 6, 2 * max(block_size, 256)  # 6 x 512: non-square, several blocks per row
    n_blocks = rows * row_length // block_size
    data = random_blocks(qtype, n_blocks, seed=int(qtype)).reshape(rows, -1)
    expected = gguf.quants.dequantize(data, qtype)
    actual = dequantize(data.reshape(-1), qtype, (rows, row_length))
    assert expected.shape == tuple(actual.shape) == (rows, row_length)
    np.testing.assert_array_equal(bits(actual), bits(expected))


def test_dequantize_rejects_bad_requests():
    with pytest.raises(SparkGPTError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), Q.IQ2_XXS, (256,))
    with pytest.raises(SparkGPTError, match="needs 34 bytes"):
        dequantize(np.zeros(35, np.uint8), Q.Q8_0, (32,))
    with pytest.raises(SparkGPTError, match="multiple of 32"):
        dequantize(np.zeros(34, np.uint8), Q.Q8_0, (2, 16))


# ---- files written by gguf.GGUFWriter ---------------------------------------------------------------------

METADATA = [  # (key, value type, value) of every scalar type, strings, and arrays of each kind
    ("t.uint8", V.UINT8, 255), ("t.int8", V.INT8, -128), ("t.uint16", V.UINT16, 65535), ("t.int16", V.INT16, -32768),
    ("t.uint32", V.UINT32, 2**32 - 1), ("t.int32", V.INT32, -(2**31)), ("t.uint64", V.UINT64, 2**64 - 1),
    ("t.int64", V.INT64, -(2**63)), ("t.float32", V.FLOAT32, 0.1), ("t.float64", V.FLOAT64, math.pi),
    ("t.true", V.BOOL, True), ("t.false", V.BOOL, False), ("t.string", V.STRING, "héllo, 世界 🙂"),
]
ARRAYS = [  # (key, element type, values)
    ("t.strings", V.STRING, ["", "a", "Ġthe", "<|im_start|>", "世界", "🙂"]),
    ("t.int32s", V.INT32, [1, -2, 3]), ("t.uint64s", V.UINT64, [0, 2**64 - 1]),
    ("t.float32s", V.FLOAT32, [0.5, -1e-3]), ("t.float64s", V.FLOAT64, [1e300, -0.0]),
    ("t.bools", V.BOOL, [True, False, True]), ("t.uint8s", V.UINT8, [0, 7]), ("t.int8s", V.INT8, [-1, 1]),
    ("t.uint16s", V.UINT16, [9]), ("t.int16s", V.INT16, [-9]), ("t.int64s", V.INT64, [-1]),
    ("t.uint32s", V.UINT32, [4]),
]


def as_written(value_type, value):
    """What a value reads back as once stored: float32 rounds."""
    if value_type == V.FLOAT32:
        return [float(np.float32(v)) for v in value] if isinstance(value, list) else float(np.float32(value))
    return value


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]], arch: str = "llama",
               alignment: int | None = None, metadata=METADATA, arrays=ARRAYS, extra=None) -> Path:
    """A GGUF file written by the reference writer: tensors are (array, quantisation type or None for as-is)."""
    writer = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value_type, value in metadata:
        writer.add_key_value(key, value, value_type)
    for key, element_type, values in arrays:
        writer.add_key_value(key, values, V.ARRAY, sub_type=element_type)
    for key, value in (extra or {}).items():
        writer.add_key_value(key, *value) if isinstance(value, tuple) else writer.add_array(key, value)
    for name, (array, qtype) in tensors.items():
        if qtype is None or qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sample_tensors() -> dict[str, tuple[np.ndarray, Q | None]]:
    rng = np.random.default_rng(1)
    return {
        "f32_3d": (rng.standard_normal((2, 3, 5)).astype(np.float32), None),
        "f16": (rng.standard_normal((3, 7)).astype(np.float16), None),
        "bf16": (rng.standard_normal((4, 32)).astype(np.float32), Q.BF16),
        "q8_0": (rng.standard_normal((5, 64)).astype(np.float32), Q.Q8_0),
        "q4_0": (rng.standard_normal((3, 96)).astype(np.float32), Q.Q4_0),
        "q4_1": (rng.standard_normal((2, 32)).astype(np.float32), Q.Q4_1),
        "vector": (rng.standard_normal(11).astype(np.float32), None),
    }


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_gguf_writer_wrote(tmp_path, alignment):
    tensors = sample_tensors()
    path = write_gguf(tmp_path / "written.gguf", tensors, alignment=alignment,
                      extra={"t.nested": ([[1, 2], [3, 4, 5]], V.ARRAY, V.ARRAY)})
    ours = read_gguf(path)
    assert ours.version == 3 and ours.alignment == (alignment or 32)
    for key, value_type, value in METADATA:
        assert ours.metadata[key] == as_written(value_type, value), key
        assert type(ours.metadata[key]) is type(value), key
    for key, element_type, values in ARRAYS:
        assert ours.metadata[key] == as_written(element_type, values), key
    assert ours.metadata["general.architecture"] == "llama"

    reference = gguf.GGUFReader(path)
    assert list(ours.metadata) == [k for k in reference.fields if not k.startswith("GGUF.")]
    for key, field in reference.fields.items():
        if not key.startswith("GGUF.") and key != "t.nested":  # the reader flattens nested arrays
            assert ours.metadata[key] == field.contents(), key

    assert list(ours.tensors) == list(tensors) == [t.name for t in reference.tensors]
    for ref in reference.tensors:
        info = ours.tensors[ref.name]
        array, qtype = tensors[ref.name]
        assert info.shape == tuple(reversed(ref.shape.tolist())) == array.shape
        assert (info.ggml_type, info.type_name) == (int(ref.tensor_type), ref.tensor_type.name)
        assert (info.offset, info.n_bytes) == (ref.data_offset, ref.n_bytes)
        np.testing.assert_array_equal(ours.raw(ref.name), ref.data.view(np.uint8).reshape(-1))
        expected = gguf.quants.dequantize(ref.data, ref.tensor_type)
        np.testing.assert_array_equal(bits(ours.tensor(ref.name)), bits(expected.reshape(array.shape)))
        if qtype is None:
            np.testing.assert_array_equal(ours.tensor(ref.name).numpy(), array.astype(np.float32))
    assert ours.tensor("q8_0", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_raw_is_a_view_of_the_file(tmp_path):
    path = write_gguf(tmp_path / "view.gguf", sample_tensors())
    raw = read_gguf(path).raw("q8_0")
    assert raw.dtype == np.uint8 and isinstance(raw, np.memmap) and not raw.flags.writeable


def test_tokenizer_sized_string_array_parses_fast(tmp_path):
    tokens = [f"tok{i}_" + "é" * (i % 7) for i in range(49152)]
    path = write_gguf(tmp_path / "vocab.gguf", {"x": (np.ones(4, np.float32), None)},
                      extra={"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": tokens[:48900]})
    start = time.perf_counter()
    ours = read_gguf(path)
    elapsed = time.perf_counter() - start
    assert ours.metadata["tokenizer.ggml.tokens"] == tokens
    assert ours.metadata["tokenizer.ggml.merges"] == tokens[:48900]
    assert elapsed < 1.0, f"parsing 98k strings took {elapsed:.2f} s"


def test_missing_file_and_big_endian_file(tmp_path):
    with pytest.raises(SparkGPTError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")
    writer = gguf.GGUFWriter(tmp_path / "big.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SparkGPTError, match=r"big\.gguf: at byte 4: GGUF version 50331648 is not supported"):
        read_gguf(tmp_path / "big.gguf")


# ---- corrupt files: struct-level fuzzing ------------------------------------------------------------------

SCALAR_FORMATS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
                  V.FLOAT32: "f", V.BOOL: "B", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


class RawGGUF:
    """GGUF bytes written field by field with struct, remembering each field's offset so tests can corrupt it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.at: dict[str, int] = {}

    def put(self, label: str, fmt: str, value) -> None:
        self.at[label] = len(self.data)
        self.data += struct.pack("<" + fmt, value)

    def string(self, label: str, text: str | bytes) -> None:
        raw = text.encode() if isinstance(text, str) else text
        self.put(label + ".len", "Q", len(raw))
        self.at[label] = len(self.data)
        self.data += raw

    def value(self, label: str, value_type: int, value) -> None:
        if value_type == V.STRING:
            self.string(label, value)
        elif value_type == V.ARRAY:
            element_type, items = value
            self.put(label + ".element_type", "I", element_type)
            self.put(label + ".count", "Q", len(items))
            for i, item in enumerate(items):
                self.value(f"{label}.{i}", element_type, item)
        else:
            self.put(label, SCALAR_FORMATS[value_type], value)


Q8_0_BLOCK = struct.pack("<e", 0.5) + bytes(range(32))
DEFAULT_KVS = [
    ("general.architecture", V.STRING, "llama"), ("t.u8", V.UINT8, 7), ("t.i64", V.INT64, -5),
    ("t.f32", V.FLOAT32, 0.5), ("t.bool", V.BOOL, 1), ("t.tokens", V.ARRAY, (V.STRING, ["a", "bc", "🙂"])),
    ("t.ints", V.ARRAY, (V.INT32, [1, 2, 3])), ("t.nested", V.ARRAY, (V.ARRAY, [(V.UINT8, [1, 2])])),
]
DEFAULT_TENSORS = [  # (name, GGUF dims, ggml type, data)
    ("a", (32, 2), Q.Q8_0, Q8_0_BLOCK * 2), ("b", (4, 3), Q.F32, struct.pack("<12f", *range(12))),
]


def raw_gguf(kvs=DEFAULT_KVS, tensors=DEFAULT_TENSORS, version: int = 3, alignment: int = 32,
             offsets: list[int] | None = None) -> RawGGUF:
    """A small valid GGUF (unless told otherwise) that ends exactly where its last tensor's data ends."""
    raw = RawGGUF()
    raw.data += b"GGUF"
    raw.put("version", "I", version)
    raw.put("n_tensors", "Q", len(tensors))
    raw.put("n_kv", "Q", len(kvs))
    for i, (key, value_type, value) in enumerate(kvs):
        raw.string(f"kv{i}.key", key)
        raw.put(f"kv{i}.type", "I", value_type)
        raw.value(f"kv{i}.value", value_type, value)
    if offsets is None:
        offsets, end = [], 0
        for *_, data in tensors:
            offsets.append(end + (-end % alignment))
            end = offsets[-1] + len(data)
    for i, ((name, dims, ggml_type, _), offset) in enumerate(zip(tensors, offsets, strict=True)):
        raw.string(f"t{i}.name", name)
        raw.put(f"t{i}.n_dims", "I", len(dims))
        for j, dim in enumerate(dims):
            raw.put(f"t{i}.dim{j}", "Q", dim)
        raw.put(f"t{i}.type", "I", ggml_type)
        raw.put(f"t{i}.offset", "Q", offset)
    data_start = len(raw.data) + (-len(raw.data) % alignment)
    raw.at["data"] = data_start
    for (*_, data), offset in zip(tensors, offsets, strict=True):
        raw.data += bytes(data_start + offset - len(raw.data)) if data_start + offset > len(raw.data) else b""
        raw.data[data_start + offset:data_start + offset + len(data)] = data
    return raw


def assert_clean_error(path: Path, match: str | None = None) -> SparkGPTError:
    """Reading `path` gives a one-line SparkGPTError naming the file and a byte, quickly and in little memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(SparkGPTError) as caught:
            read_gguf(path)
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    message = str(caught.value)
    assert message.startswith(f"{path}: at byte ") and "\n" not in message, message
    assert match is None or match in message, message
    assert elapsed < 1.0 and peak < 4 * 2**20, (elapsed, peak)
    return caught.value


@pytest.mark.parametrize("version", [2, 3])
def test_the_hand_built_file_is_valid(tmp_path, version):
    # The fuzzing below corrupts this file; first, it must read correctly (and as the reference reads it).
    path = tmp_path / "small.gguf"
    path.write_bytes(raw_gguf(version=version).data)
    ours = read_gguf(path)
    assert ours.version == version
    assert ours.metadata == {"general.architecture": "llama", "t.u8": 7, "t.i64": -5, "t.f32": 0.5, "t.bool": True,
                             "t.tokens": ["a", "bc", "🙂"], "t.ints": [1, 2, 3], "t.nested": [[1, 2]]}
    reference = gguf.GGUFReader(path)
    for ref in reference.tensors:
        np.testing.assert_array_equal(bits(ours.tensor(ref.name)),
                                      bits(gguf.quants.dequantize(ref.data, ref.tensor_type)))
    assert ours.tensors["a"].shape == (2, 32) and ours.tensors["b"].shape == (3, 4)
    np.testing.assert_array_equal(ours.tensor("b").numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))


def test_every_truncation_is_a_clean_error(tmp_path):
    data = raw_gguf().data
    path = tmp_path / "truncated.gguf"
    for length in range(len(data)):
        path.write_bytes(data[:length])
        with pytest.raises(SparkGPTError) as caught:
            read_gguf(path)
        assert str(caught.value).startswith(f"{path}: at byte "), (length, str(caught.value))


CORRUPTIONS = [  # (field, struct format, value, what the message says)
    ("version", "I", 1, "version 1 is not supported"),
    ("version", "I", 4, "version 4 is not supported"),
    ("n_tensors", "Q", 2**62, "tensor count"),
    ("n_tensors", "Q", 2**64 - 1, "tensor count"),
    ("n_tensors", "Q", 3, ""),
    ("n_kv", "Q", 2**63, "metadata key/value count"),
    ("n_kv", "Q", 9, ""),
    ("kv0.key.len", "Q", 99999999, "metadata key length 99999999 exceeds the"),
    ("kv0.key.len", "Q", 2**64 - 1, "exceeds the"),
    ("kv1.type", "I", 13, "unknown metadata value type 13"),
    ("kv1.type", "I", 2**32 - 1, "unknown metadata value type"),
    ("kv1.type", "I", V.STRING, ""),
    ("kv1.type", "I", V.ARRAY, ""),
    ("kv4.value", "B", 2, "bool value 2"),
    ("kv5.value.element_type", "I", 99, "unknown array element type 99"),
    ("kv5.value.count", "Q", 2**40, "array length"),
    ("kv5.value.count", "Q", 2**64 - 1, "array length"),
    ("kv5.value.1.len", "Q", 2**50, "exceeds the"),
    ("kv5.value.2", "B", 0xFF, "not valid UTF-8"),
    ("kv6.value.count", "Q", 2**61, "array length"),
    ("kv6.value.element_type", "I", V.FLOAT64, ""),
    ("kv7.value.count", "Q", 2**60, "array length"),
    ("t0.name.len", "Q", 2**33, "exceeds the"),
    ("t0.n_dims", "I", 0, "0 dims"),
    ("t0.n_dims", "I", 5, "5 dims"),
    ("t0.n_dims", "I", 2**31, "dims; expected 1 to 4"),
    ("t0.dim0", "Q", 0, "must all be positive"),
    ("t0.dim1", "Q", 2**64 - 1, "must all be positive"),
    ("t0.dim0", "Q", 2**62 - 2**62 % 32, ""),
    ("t0.dim1", "Q", 2**40, "run past the end"),
    ("t0.dim0", "Q", 33, "row length 33 is not a multiple of Q8_0's block size 32"),
    ("t0.type", "I", 4, "unknown ggml type 4"),
    ("t0.type", "I", 2**32 - 1, "unknown ggml type"),
    ("t0.type", "I", Q.Q6_K, "row length 32 is not a multiple of Q6_K's block size 256"),
    ("t1.type", "I", Q.F64, "run past the end"),
    ("t0.offset", "Q", 1, "not a multiple of the alignment 32"),
    ("t0.offset", "Q", 2**63, "run past the end"),
    ("t0.offset", "Q", 2**64 - 32, "run past the end"),
    ("t1.offset", "Q", 0, "overlaps or precedes"),
    ("t1.offset", "Q", 4096, "run past the end"),
]


@pytest.mark.parametrize(("field", "fmt", "value", "match"), CORRUPTIONS,
                         ids=[f"{c[0]}={c[2]}" for c in CORRUPTIONS])
def test_corrupt_field_is_a_clean_error(tmp_path, field, fmt, value, match):
    raw = raw_gguf()
    struct.pack_into("<" + fmt, raw.data, raw.at[field], value)
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(raw.data)
    assert_clean_error(path, match)


def test_bad_magic(tmp_path):
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGML" + raw_gguf().data[4:])
    assert_clean_error(path, "not a GGUF file")
    path.write_bytes(b"")
    assert_clean_error(path, "empty")


def test_error_message_names_the_byte(tmp_path):
    raw = raw_gguf()
    struct.pack_into("<Q", raw.data, raw.at["kv2.key.len"], 99999999)
    path = tmp_path / "model.gguf"
    path.write_bytes(raw.data)
    left = len(raw.data) - raw.at["kv2.key.len"] - 8
    assert str(assert_clean_error(path)) == \
        f"{path}: at byte {raw.at['kv2.key.len']}: metadata key length 99999999 exceeds the {left} bytes left"


KVS_AND_TENSORS = {  # structurally well-formed files that break a rule
    "duplicate key": dict(kvs=[*DEFAULT_KVS, ("t.u8", V.UINT8, 1)]),
    "duplicate tensor": dict(tensors=[*DEFAULT_TENSORS, ("a", (4,), Q.F32, bytes(16))]),
    "alignment not a power of two": dict(kvs=[*DEFAULT_KVS, ("general.alignment", V.UINT32, 48)]),
    "alignment zero": dict(kvs=[*DEFAULT_KVS, ("general.alignment", V.UINT32, 0)]),
    "alignment a string": dict(kvs=[*DEFAULT_KVS, ("general.alignment", V.STRING, "32")]),
    "arrays nested too deep": dict(kvs=[("deep", V.ARRAY, (V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.ARRAY, [
        (V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.ARRAY, [(V.UINT8, [1])])])])])])])])]))]),
    "tensors out of order": dict(offsets=[64, 0]),
    "element count overflows": dict(tensors=[("big", (2**32, 2**32), Q.F32, b"")]),
    "row length not a block multiple": dict(tensors=[("r", (16, 2), Q.Q4_0, bytes(36))]),
    "unknown ggml type": dict(tensors=[("u", (4,), 5, bytes(16))]),
    "invalid UTF-8 key": dict(kvs=[(b"\xc3\x28", V.UINT8, 1)]),
}


@pytest.mark.parametrize("case", list(KVS_AND_TENSORS))
def test_broken_rule_is_a_clean_error(tmp_path, case):
    expected = {"duplicate key": "duplicate metadata key 't.u8'", "duplicate tensor": "duplicate tensor name 'a'",
                "alignment not a power of two": "general.alignment 48 is not a power of two",
                "alignment zero": "general.alignment 0", "alignment a string": "general.alignment '32'",
                "arrays nested too deep": "nested deeper than 8", "tensors out of order": "overlaps or precedes",
                "element count overflows": "overflow", "row length not a block multiple": "row length 16",
                "unknown ggml type": "unknown ggml type 5", "invalid UTF-8 key": "not valid UTF-8"}[case]
    path = tmp_path / "broken.gguf"
    path.write_bytes(raw_gguf(**KVS_AND_TENSORS[case]).data)
    assert_clean_error(path, expected)


def test_random_corruption_never_escapes_as_another_exception(tmp_path):
    # Flip a few bytes of the header (where the structure is) many times over: each file either reads, with every
    # tensor then dequantising or refusing cleanly, or fails with a SparkGPTError naming the file and a byte.
    valid = raw_gguf()
    header_end = valid.at["data"]
    rng = random.Random(0)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"error": 0, "read": 0}
    start = time.perf_counter()
    for _ in range(1500):
        data = bytearray(valid.data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            data[rng.randrange(header_end)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        if rng.random() < 0.2:
            data = data[:rng.randrange(len(data))]
        path.write_bytes(data)
        try:
            parsed = read_gguf(path)
        except SparkGPTError as error:
            assert str(error).startswith(f"{path}: at byte "), str(error)
            outcomes["error"] += 1
            continue
        outcomes["read"] += 1
        for name in parsed.tensors:
            try:
                parsed.tensor(name)
            except SparkGPTError as error:
                assert str(error).startswith(f"{path}: at byte "), str(error)
    assert outcomes["error"] > 500 and outcomes["read"] > 50, outcomes
    assert time.perf_counter() - start < 20  # a guard against hangs, generous for a loaded machine


# ---- the llama architecture -------------------------------------------------------------------------------

def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows -> ggml's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(model, path: Path, qtype=None, arch: str = "llama") -> Path:
    """A transformers Llama (or Qwen2, arch="qwen2") written as llama.cpp's converter writes it (names, metadata,
    Q/K row permutation for llama only: qwen2's rope rotates halves, as transformers does)."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", config.num_key_value_heads)
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    writer.add_float32(f"{arch}.rope.freq_base", rope_theta)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for i in range(config.num_hidden_layers):
        for theirs, ggml in layer_names.items():
            names[f"model.layers.{i}.{theirs}.weight"] = f"blk.{i}.{ggml}.weight"
            names[f"model.layers.{i}.{theirs}.bias"] = f"blk.{i}.{ggml}.bias"
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp writes no output matrix for tied embeddings
    for name, tensor in state.items():
        array = tensor.numpy()
        if arch != "llama":
            pass
        elif name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads, config.num_key_value_heads)
        if qtype is not None and array.ndim == 2:
            writer.add_tensor(names[name], gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(names[name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_llama_gguf_loads_with_transformers_logits(hf_llama, tmp_path):
    # Grouped-query attention, untied embeddings, rope θ 50,000: F32 tensors, so the logits must agree to 1e-4.
    reference, _ = hf_llama
    model = load_gguf_model(write_llama_gguf(reference, tmp_path / "tiny-llama.gguf"))
    assert not model.config.tie_embeddings and model.config.n_kv_heads == 2
    assert model.config.rope_theta == 50000.0
    ids = torch.randint(0, reference.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_qwen2_gguf_loads_with_the_logits_of_transformers_and_of_its_gguf_reader(hf_qwen2, tmp_path):
    # q/k/v biases, tied embeddings, rope θ 1e6, no Q/K row permutation; transformers reads the same file as well.
    transformers = pytest.importorskip("transformers")
    reference, _ = hf_qwen2
    path = write_llama_gguf(reference, tmp_path / "tiny-qwen2.gguf", arch="qwen2")
    model = load_gguf_model(path)
    assert model.config.qkv_bias and model.config.tie_embeddings and model.config.rope_theta == 1e6
    ids = torch.randint(0, reference.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 7 tokens: within the sliding window, which GGUF metadata does not carry
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
        torch.testing.assert_close(model(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_qwen3_gguf_loads_with_the_logits_of_transformers_and_of_its_gguf_reader(hf_qwen3, tmp_path):
    transformers = pytest.importorskip("transformers")
    reference, _ = hf_qwen3  # heads of 32 in a 64-wide model: the file's attention.key_length says so
    model = load_gguf_model(write_llama_gguf(reference, tmp_path / "wide-heads.gguf", arch="qwen3"))
    assert model.config.qk_norm and model.config.head_dim == 32 and not model.config.qkv_bias
    ids = torch.randint(0, reference.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)
    # transformers' GGUF reader ignores attention.key_length and takes Qwen3's default head_dim of 128 (that of
    # every released Qwen3): compare with it on a model of that shape.
    config = reference.config.to_dict() | {"head_dim": 128}
    torch.manual_seed(1)
    standard = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config)).eval()
    path = write_llama_gguf(standard, tmp_path / "tiny-qwen3.gguf", arch="qwen3")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_gguf_model(path)(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_load_in_bfloat16(hf_llama, tmp_path):
    reference, _ = hf_llama
    model = load_gguf_model(write_llama_gguf(reference, tmp_path / "tiny-llama.gguf"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = reference.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(model.token_embedding.weight, expected)


def test_unsupported_architecture_and_missing_metadata(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"x": (np.ones(4, np.float32), None)}, arch="gpt2")
    with pytest.raises(SparkGPTError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported; supported: llama"):
        load_gguf_model(path)
    path = write_gguf(tmp_path / "bare.gguf", {"x": (np.ones(4, np.float32), None)})
    with pytest.raises(SparkGPTError, match=r"bare\.gguf: missing metadata key 'llama\.embedding_length'"):
        load_gguf_model(path)


def test_wrong_tensors_are_clean_errors(hf_llama, tmp_path):
    reference, _ = hf_llama
    path = write_llama_gguf(reference, tmp_path / "tiny-llama.gguf")
    data = bytearray(path.read_bytes())
    # Claim one more layer than the file holds, then one fewer: missing and unexpected tensors.
    at = data.index(b"llama.block_count") + len("llama.block_count") + 4
    for layers, message in ((4, "missing tensor(s) blk.3."), (2, "unexpected tensor(s) blk.2.")):
        struct.pack_into("<I", data, at, layers)
        (tmp_path / "layers.gguf").write_bytes(data)
        with pytest.raises(SparkGPTError, match=re.escape(f"layers.gguf: {message}")):
            load_gguf_model(tmp_path / "layers.gguf")
    struct.pack_into("<I", data, at, 3)
    at = data.index(b"llama.feed_forward_length") + len("llama.feed_forward_length") + 4
    struct.pack_into("<I", data, at, 100)
    (tmp_path / "shape.gguf").write_bytes(data)
    with pytest.raises(SparkGPTError, match=r"shape.gguf: at byte \d+: tensor blk.0.ffn_gate.weight has shape"):
        load_gguf_model(tmp_path / "shape.gguf")


# ---- the real SmolLM2-135M-Instruct Q4_1 file ---------------------------------------------------------------

@pytest.mark.slow
def test_real_file_reads_as_the_gguf_reader_reads_it(smollm2_gguf):
    start = time.perf_counter()
    ours = read_gguf(smollm2_gguf)
    assert time.perf_counter() - start < 1.0
    reference = gguf.GGUFReader(smollm2_gguf)
    assert list(ours.metadata) == [k for k in reference.fields if not k.startswith("GGUF.")]
    for key, field in reference.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert [t.name for t in reference.tensors] == list(ours.tensors)
    for ref in reference.tensors:
        info = ours.tensors[ref.name]
        assert (info.shape, info.ggml_type, info.offset, info.n_bytes) == \
            (tuple(reversed(ref.shape.tolist())), int(ref.tensor_type), ref.data_offset, ref.n_bytes)
    assert {t.type_name for t in ours.tensors.values()} == {"Q4_1", "Q8_0", "F32"}


@pytest.fixture(scope="module")
def our_smollm2(smollm2_gguf):
    return load_gguf_model(smollm2_gguf)


@pytest.mark.slow
def test_real_config_equals_what_transformers_derived(smollm2_gguf, hf_smollm2):
    theirs = hf_smollm2[0].config
    ours = gguf_model_config(read_gguf(smollm2_gguf))
    rope_theta = (getattr(theirs, "rope_parameters", None) or {}).get("rope_theta", getattr(theirs, "rope_theta", None))
    assert (ours.vocab_size, ours.n_layers, ours.n_heads, ours.n_kv_heads, ours.d_model, ours.d_ff, ours.head_dim,
            ours.max_seq_len, ours.rope_theta, ours.norm_eps, ours.tie_embeddings, ours.bos_token_id,
            ours.eos_token_id) == \
        (theirs.vocab_size, theirs.num_hidden_layers, theirs.num_attention_heads, theirs.num_key_value_heads,
         theirs.hidden_size, theirs.intermediate_size, theirs.head_dim, theirs.max_position_embeddings,
         rope_theta, theirs.rms_norm_eps, theirs.tie_word_embeddings, theirs.bos_token_id, theirs.eos_token_id)
    assert (ours.positions, ours.norm, ours.ffn, ours.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert theirs.hidden_act == "silu" and not theirs.attention_bias and not theirs.mlp_bias


@pytest.mark.slow
def test_real_weights_equal_transformers_bit_for_bit(our_smollm2, hf_smollm2):
    # Dequantisation (Q4_1, Q8_0, F32) and the Q/K row order both agree with transformers' reading of the file.
    theirs = hf_smollm2[0].state_dict()
    ours = our_smollm2.state_dict()
    for our_name, their_name in families.llama_tensor_names(our_smollm2.config).items():
        assert torch.equal(ours[our_name], theirs[their_name]), our_name
    assert ours["lm_head.weight"].data_ptr() == ours["token_embedding.weight"].data_ptr()


@pytest.mark.slow
def test_real_model_logits_equal_transformers(our_smollm2, hf_smollm2):
    reference, tokenizer = hf_smollm2
    texts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n",
             "<|im_start|>user\nWhat is gravity?<|im_end|>\n<|im_start|>assistant\n"]
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        assert ids.shape[1] >= 5
        with torch.no_grad():
            expected = reference(ids).logits
            actual = our_smollm2(ids)
        assert (actual - expected).abs().max().item() <= 1e-4, text
        assert torch.equal(actual[0, -1].argmax(), expected[0, -1].argmax())


def test_gguf_file_is_the_public_type(tmp_path):
    path = write_gguf(tmp_path / "typed.gguf", sample_tensors())
    parsed = read_gguf(path)
    assert isinstance(parsed, GGUFFile) and parsed.path == path and "typed.gguf" in repr(parsed)
    with pytest.raises(SparkGPTError, match="no tensor named 'nope'"):
        parsed.tensor("nope")
