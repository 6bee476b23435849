"""GGUF export, checked against references: the `gguf` package's quantisers and reader, llama.cpp's Q/K
permutation (as convert_hf_to_gguf.py writes it), transformers loading the exported file (gguf_file=), and
llama.cpp itself running it (node-llama-cpp's prebuilt CPU build, installed into tools/llama_cpp by `make test`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import processors

import sparkgpt
from sparkgpt import cli
from sparkgpt.checkpoint import gguf_export
from sparkgpt.checkpoint.gguf import (
    llama_tensor_names,
    load_gguf_model,
    permute_rope_rows,
    read_gguf,
    unpermute_rope_rows,
)
from sparkgpt.checkpoint.gguf_export import encode_tensor, write_gguf
from sparkgpt.checkpoint.gguf_tokenizer import read_tokenizer
from sparkgpt.config import preset
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import GPT
from sparkgpt.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
from conftest import CORPUS, train_byte_bpe  # noqa: E402
from test_gguf import bits, llama_cpp_permute  # noqa: E402

Q = gguf.GGMLQuantizationType
TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}


# ---- quantisers against gguf.quants ---------------------------------------------------------------------------

def awkward_rows() -> np.ndarray:
    """Rows of 256 (8 blocks) that reach every branch: ordinary weights, an all-zero block, exact ties after
    scaling (roundf rounds them away from zero, np.round to even), 0.49999997 (which trunc(x + 0.5) rounds up),
    a block whose largest magnitude is negative, and tiny and large magnitudes."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((12, 256)).astype(np.float32) * np.float32(0.02)
    rows[1, :32] = 0
    rows[2, :32] = np.concatenate([[127, -127], np.arange(-14.5, 15.5)])  # Q8_0 scale 1: exact halves
    rows[3, :32] = np.concatenate([[-8], np.arange(-7.75, 0, 0.25)])     # Q4_0 scale 1: exact ties at +8.5
    rows[4, :32] = 0.49999997
    rows[4, 0] = 127
    rows[5, 32:64] = -rng.random(32)
    rows[5, 40] = -5
    rows[6] *= np.float32(1e-6)
    rows[7] *= np.float32(1e3)
    return rows


@pytest.mark.parametrize("dtype", list(TYPES))
def test_encoding_equals_gguf_bit_for_bit(dtype):
    values = awkward_rows()
    ties = values[2, 2:32]
    assert (np.round(ties) != np.trunc(ties + 0.5 * np.sign(ties))).any()  # the rounding rule matters here
    expected = np.ascontiguousarray(gguf.quants.quantize(values, TYPES[dtype])).view(np.uint8).reshape(-1)
    actual = encode_tensor(values, gguf_export.DTYPES[dtype][0])
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantisation_error_is_within_a_step(dtype):
    # Independent of the gguf package: every value lands within half a quantisation step of itself (plus the
    # float16 rounding of the scale), the step being max|x| / 127 (Q8_0) or max|x| / 8 (Q4_0) of its block;
    # Q4_0's levels run -8..7 steps, so values at the far end from the block's extreme clip by up to a full step.
    values = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    ggml_type = gguf_export.DTYPES[dtype][0]
    restored = gguf.quants.dequantize(encode_tensor(values, ggml_type).reshape(64, -1), TYPES[dtype])
    block_max = np.abs(values.reshape(-1, 32)).max(axis=1, keepdims=True)
    step = block_max / (127 if dtype == "q8_0" else 8)
    error = np.abs(restored.reshape(-1, 32) - values.reshape(-1, 32))
    assert (error <= step * (0.5 if dtype == "q8_0" else 1.0) + block_max * 2e-3).all()
    assert 0.2 < (error / step).mean() < 0.3  # uniform rounding error averages a quarter step


def test_permutation_is_llama_cpps_and_the_readers_inverse():
    weight = torch.randn(6 * 16, 40)
    for n_heads in (6, 2):
        permuted = permute_rope_rows(weight, n_heads)
        np.testing.assert_array_equal(permuted.numpy(), llama_cpp_permute(weight.numpy(), n_heads, n_heads))
        assert torch.equal(unpermute_rope_rows(permuted, n_heads), weight)
        assert not torch.equal(permuted, weight)


# ---- a tiny random Llama (grouped-query attention, untied head, d_ff 200: not a whole number of blocks) -------

@pytest.fixture(scope="module")
def tiny_lm(hf_llama):
    return sparkgpt.load(hf_llama[1], device="cpu")


def expected_type(name: str, shape: tuple[int, ...], dtype: str, tied: bool) -> Q:
    """What llama.cpp's converter (f16, q8_0) and quantizer (q4_0) choose, spelled out independently."""
    if len(shape) == 1:
        return Q.F32
    output = name == ("token_embd.weight" if tied else "output.weight")
    wanted = Q.Q8_0 if dtype == "q4_0" and output else TYPES[dtype]
    return Q.F16 if shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0] else wanted


@pytest.mark.parametrize("dtype", list(TYPES))
def test_tiny_llama_tensors_read_back(tiny_lm, tmp_path, dtype):
    path = write_gguf(tiny_lm.model, tiny_lm.tokenizer, tmp_path / "tiny.gguf", dtype)
    file = read_gguf(path)
    config = tiny_lm.config
    state = tiny_lm.model.state_dict()
    names = llama_tensor_names(config)
    assert set(file.tensors) == set(names.values())
    types = set()
    for ours, theirs in names.items():
        reference = state[ours].numpy()
        if ours.endswith("q_proj.weight"):
            reference = llama_cpp_permute(reference, config.n_heads, config.n_heads)
        elif ours.endswith("k_proj.weight"):
            reference = llama_cpp_permute(reference, config.n_heads, config.n_kv_heads)
        info = file.tensors[theirs]
        qtype = expected_type(theirs, info.shape, dtype, config.tie_embeddings)
        types.add(qtype)
        assert info.shape == reference.shape and info.ggml_type == qtype, theirs
        expected = np.ascontiguousarray(gguf.quants.quantize(reference, qtype)).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(file.raw(theirs), expected, err_msg=theirs)
        if qtype == Q.F32:
            np.testing.assert_array_equal(bits(file.tensor(theirs)), bits(reference))
    if dtype in ("q8_0", "q4_0"):  # ffn_down's rows of 200 are not whole blocks: F16, the converter's fallback
        assert file.tensors["blk.0.ffn_down.weight"].ggml_type == Q.F16 and TYPES[dtype] in types
    model = load_gguf_model(file)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    tolerance = {"f32": 1e-5, "f16": 2e-3, "q8_0": 2e-2, "q4_0": 0.4}[dtype]
    with torch.no_grad():
        assert (model(ids) - tiny_lm.model(ids)).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype", ["f16", "q4_0"])
def test_tiny_llama_export_loads_in_transformers(hf_llama, tiny_lm, tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    reference, _ = hf_llama
    path = write_gguf(tiny_lm.model, tiny_lm.tokenizer, tmp_path / "tiny.gguf", dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ours = sparkgpt.load(path, device="cpu").model
    ids = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exported = theirs(ids).logits
        assert (exported - ours(ids)).abs().max().item() <= 1e-4  # the same file, two readers
        assert (exported - reference(ids).logits).abs().max().item() <= {"f16": 2e-3, "q4_0": 0.4}[dtype]


def test_tiny_llama_metadata_through_gguf_reader(tiny_lm, tmp_path):
    path = write_gguf(tiny_lm.model, tiny_lm.tokenizer, tmp_path / "tiny.gguf", "q8_0", name="tiny test")
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    config = tiny_lm.config
    assert reader.fields["GGUF.version"].contents() == 3 and reader.alignment == 32
    assert {key: value for key, value in fields.items() if not key.startswith("tokenizer.")} == {
        "general.architecture": "llama", "general.type": "model", "general.name": "tiny test",
        "general.file_type": 7, "general.quantization_version": 2, "llama.vocab_size": config.vocab_size,
        "llama.context_length": 256, "llama.embedding_length": 96, "llama.block_count": 3,
        "llama.feed_forward_length": 200, "llama.attention.head_count": 6, "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 50000.0, "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
        "llama.rope.dimension_count": 16,
    }
    assert reader.fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]
    assert reader.fields["llama.rope.freq_base"].types == [gguf.GGUFValueType.FLOAT32]
    vocab = tiny_lm.tokenizer.backend.get_vocab(with_added_tokens=True)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.token_type"] == [3 if token == "<|endoftext|>" else 1 for token in sorted(vocab,
                                                                                                        key=vocab.get)]
    merges = json.loads(tiny_lm.tokenizer.backend.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges] and len(merges) > 10
    assert fields["tokenizer.ggml.eos_token_id"] == vocab["<|endoftext|>"]
    assert fields["tokenizer.ggml.add_bos_token"] is False
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type) for t in reader.tensors}
    state = tiny_lm.model.state_dict()
    assert tensors == {theirs: (tuple(state[ours].shape), expected_type(theirs, tuple(state[ours].shape), "q8_0",
                                                                        False))
                       for ours, theirs in llama_tensor_names(config).items()}


@pytest.fixture(scope="module")
def tied_lm_with_bos():
    """A tied-embedding Llama whose vocabulary (512) is larger than its tokenizer's (320), whose tokenizer adds a
    beginning-of-text token, and which has a chat template."""
    tokenizer = train_byte_bpe()
    tokenizer.backend.add_special_tokens(["<s>"])
    bos_id = tokenizer.backend.token_to_id("<s>")
    tokenizer.backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    tokenizer.bos_token = "<s>"
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    torch.manual_seed(0)
    model = GPT(preset("tiny-llama", tie_embeddings=True, bos_token_id=bos_id)).eval()
    return sparkgpt.LM(model, tokenizer)


def test_tokenizer_padding_bos_and_chat_template_round_trip(tied_lm_with_bos, tmp_path):
    lm = tied_lm_with_bos
    path = write_gguf(lm.model, lm.tokenizer, tmp_path / "tied.gguf", "q4_0")
    file = read_gguf(path)
    metadata = file.metadata
    n_tokens = lm.tokenizer.vocab_size
    assert len(metadata["tokenizer.ggml.tokens"]) == lm.config.vocab_size == 512 > n_tokens
    assert metadata["tokenizer.ggml.tokens"][n_tokens:] == [f"[PAD{i}]" for i in range(n_tokens, 512)]
    assert set(metadata["tokenizer.ggml.token_type"][n_tokens:]) == {5}
    assert metadata["tokenizer.ggml.add_bos_token"] is True
    assert metadata["tokenizer.ggml.bos_token_id"] == lm.tokenizer.bos_token_id
    assert metadata["tokenizer.chat_template"] == lm.tokenizer.chat_template
    assert file.tensors["token_embd.weight"].type_name == "Q8_0"  # tied: it is also the output matrix
    assert file.tensors["blk.0.attn_q.weight"].type_name == "Q4_0"
    assert "output.weight" not in file.tensors
    again = read_tokenizer(metadata)
    for text in CORPUS[:5]:
        assert again.encode(text) == lm.tokenizer.encode(text) and again.encode(text)[0] == again.bos_token_id
    messages = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(messages) == lm.tokenizer.apply_chat_template(messages)


# ---- errors and atomicity -------------------------------------------------------------------------------------

def test_non_llama_models_and_bad_dtype_are_clean_errors(tiny_lm, tokenizer, tmp_path):
    for name in ("tiny-gpt2", "tiny-moe", "tiny-bert"):
        model = GPT(preset(name)) if name != "tiny-bert" else sparkgpt.model.Encoder(preset(name))
        with pytest.raises(SparkGPTError, match="GGUF export supports Llama-family models"):
            write_gguf(model, tokenizer, tmp_path / "x.gguf")
    with pytest.raises(SparkGPTError, match="GGUF dtype 'q5_k' is not supported; expected one of f32, f16, q8_0"):
        write_gguf(tiny_lm.model, tiny_lm.tokenizer, tmp_path / "x.gguf", "q5_k")
    assert not list(tmp_path.iterdir())


def test_tokenizers_that_cannot_be_exported(tiny_lm, tmp_path):
    with pytest.raises(SparkGPTError, match="needs the model's tokenizer"):
        write_gguf(tiny_lm.model, None, tmp_path / "x.gguf")
    char_level = Tokenizer.char_level(["abc"])
    with pytest.raises(SparkGPTError, match="byte-level BPE"):
        write_gguf(tiny_lm.model, char_level, tmp_path / "x.gguf")
    small = sparkgpt.LM(GPT(preset("tiny-llama", vocab_size=100)), tiny_lm.tokenizer)
    with pytest.raises(SparkGPTError, match="the model's vocabulary has only 100 rows"):
        write_gguf(small.model, small.tokenizer, tmp_path / "x.gguf")


def test_bad_weights_and_paths(tiny_lm, tmp_path):
    model = GPT(tiny_lm.config)
    model.load_state_dict(tiny_lm.model.state_dict())
    with torch.no_grad():
        model.blocks[1].ffn.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(SparkGPTError, match=r"tensor blocks\.1\.ffn\.up_proj\.weight has values that are not finite"):
        write_gguf(model, tiny_lm.tokenizer, tmp_path / "x.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(SparkGPTError, match=r"dir\.gguf: is a directory"):
        write_gguf(tiny_lm.model, tiny_lm.tokenizer, tmp_path / "dir.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf"]


def test_a_failed_write_leaves_the_old_file(tiny_lm, tmp_path, monkeypatch):
    path = write_gguf(tiny_lm.model, tiny_lm.tokenizer, tmp_path / "model.gguf", "f16")
    before = path.read_bytes()
    calls = []

    def fail_midway(values, ggml_type):
        calls.append(ggml_type)
        if len(calls) == 5:
            raise OSError("disk full")
        return encode_tensor(values, ggml_type)

    monkeypatch.setattr(gguf_export, "encode_tensor", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(tiny_lm.model, tiny_lm.tokenizer, path, "q8_0")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


# ---- the command line ---------------------------------------------------------------------------------------

def test_cli_convert_writes_gguf(hf_llama, hf_gpt2, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert cli.main(["convert", str(hf_llama[1]), str(out), "--dtype", "q4_0"]) == 0
    assert f"wrote {out} (q4_0)" in capsys.readouterr().out
    assert read_gguf(out).metadata["general.file_type"] == 2
    assert cli.main(["convert", str(hf_llama[1]), str(tmp_path / "default.gguf")]) == 0
    assert read_gguf(tmp_path / "default.gguf").tensors["blk.0.attn_q.weight"].type_name == "F16"
    capsys.readouterr()
    cases = [([str(hf_llama[1]), str(tmp_path / "x.gguf"), "--dtype", "bfloat16"], "GGUF dtype 'bfloat16'"),
             ([str(hf_llama[1]), str(tmp_path / "dir"), "--dtype", "q8_0"], "--dtype q8_0 is a GGUF type"),
             ([str(hf_gpt2[1]), str(tmp_path / "gpt2.gguf")], "supports Llama-family models")]
    for args, message in cases:
        assert cli.main(["convert", *args]) == 1
        error = capsys.readouterr().err
        assert error.startswith("sparkgpt: error: ") and message in error and error.count("\n") == 1


# ---- the real SmolLM2-135M-Instruct (a Q4_1 file, loaded as fp32 weights and exported) -------------------------

TEXTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n",
         "<|im_start|>user\nWhat is gravity?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def smollm2_lm(smollm2_gguf):
    return sparkgpt.load(smollm2_gguf, device="cpu")


@pytest.fixture(scope="module")
def smollm2_exports(smollm2_lm, tmp_path_factory):
    directory = tmp_path_factory.mktemp("smollm2-gguf")
    return {dtype: write_gguf(smollm2_lm.model, smollm2_lm.tokenizer, directory / f"smollm2-{dtype}.gguf", dtype)
            for dtype in ("f16", "q8_0")}


@pytest.mark.slow
def test_smollm2_export_reads_back(smollm2_gguf, smollm2_exports):
    original = read_gguf(smollm2_gguf).metadata
    kept = [key for key in original if key.startswith("llama.") or key in (
        "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")]
    assert len(kept) == 20
    for dtype, path in smollm2_exports.items():
        ours = read_gguf(path)
        for key in kept:
            assert ours.metadata[key] == original[key], (dtype, key)
        assert ours.metadata["general.file_type"] == {"f16": 1, "q8_0": 7}[dtype]
    reader = gguf.GGUFReader(smollm2_exports["q8_0"])
    assert reader.fields["llama.attention.head_count_kv"].contents() == 3
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert reader.fields["tokenizer.chat_template"].contents() == original["tokenizer.chat_template"]
    tensors = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in reader.tensors}
    assert len(tensors) == 1 + 1 + 30 * 9  # token_embd (tied: no output.weight), output_norm, 30 blocks
    assert tensors["token_embd.weight"] == ((576, 49152), Q.Q8_0)
    assert tensors["blk.29.ffn_down.weight"] == ((1536, 576), Q.Q8_0)
    assert tensors["blk.0.attn_k.weight"] == ((576, 192), Q.Q8_0)
    assert tensors["output_norm.weight"] == ((576,), Q.F32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smollm2_export_loads_in_transformers(smollm2_lm, smollm2_exports, dtype):
    transformers = pytest.importorskip("transformers")
    path = smollm2_exports[dtype]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    exported = load_gguf_model(path)
    for text in TEXTS:
        ids = torch.tensor([smollm2_lm.tokenizer.encode(text)])
        with torch.no_grad():
            their_logits, original = theirs(ids).logits, smollm2_lm.model(ids)
            assert (their_logits - exported(ids)).abs().max().item() <= 1e-4, text  # one file, two readers
        # The export's own rounding: measured 0.035 (f16) and 0.88 (q8_0) on logits of magnitude up to 41.
        assert (their_logits - original).abs().max().item() <= {"f16": 0.1, "q8_0": 1.5}[dtype], text
        assert torch.equal(their_logits[0, -1].argmax(), original[0, -1].argmax()), text


@pytest.mark.slow
def test_smollm2_f16_greedy_text_equals_the_original(smollm2_lm, smollm2_exports):
    exported = sparkgpt.load(smollm2_exports["f16"], device="cpu")
    texts = TEXTS[:2]
    assert exported.generate(texts, max_new_tokens=16, temperature=0) == \
        smollm2_lm.generate(texts, max_new_tokens=16, temperature=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = exported.chat(question, temperature=0, max_new_tokens=12)
    assert answer == smollm2_lm.chat(question, temperature=0, max_new_tokens=12) and "Paris" in answer


LLAMA_CPP = Path(__file__).parent.parent / "tools" / "llama_cpp"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_runs_the_export_to_our_greedy_text(smollm2_lm, smollm2_exports, dtype):
    """The exported file in llama.cpp: the same 16 greedy tokens as sparkgpt from the original weights."""
    if shutil.which("node") is None or not (LLAMA_CPP / "node_modules" / "node-llama-cpp").is_dir():
        pytest.skip("llama.cpp is not installed: `make test` installs it where node and npm are (.ci/run does)")
    texts = TEXTS[:2]
    result = subprocess.run(["node", str(LLAMA_CPP / "generate.mjs"), str(smollm2_exports[dtype]), "16", *texts],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == smollm2_lm.generate(texts, max_new_tokens=16, temperature=0)
