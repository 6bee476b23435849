"""Tokenizers: GGUF-described vocabularies against transformers', trained BPE and char-level round trips,
chat templates rendered as transformers renders them."""

from __future__ import annotations

import pytest
from conftest import CORPUS
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkgpt.checkpoint.gguf_tokenizer import read_tokenizer
from sparkgpt.errors import SparkGPTError
from sparkgpt.tokenizer import Tokenizer, render_chat_template

VARIED_TEXTS = [
    "Hello world!", "The capital of France is Paris.", "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }", "你好，世界。机器学习和语言模型。", "日本語のテキストも",
    "Emoji 🙂🚀👩‍💻🇫🇷 done", "   leading spaces, trailing   ", "tabs\tand\n\nnewlines\r\n", "a  b   c    d",
    "Price: 12345 dollars, π ≈ 3.14159", "naïve café Ærøskøbing Ελληνικά русский", "<|im_start|>user\nhi<|im_end|>",
    "", " ", "'s 't 're 've 'm 'll 'd", "https://example.com/path?q=1&r=2",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour. 🙂"}],
]


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_gguf, hf_smollm2):
    from sparkgpt.checkpoint.gguf import read_gguf

    ours = read_tokenizer(read_gguf(smollm2_gguf).metadata, source=str(smollm2_gguf))
    return ours, hf_smollm2[1]


@pytest.mark.slow
def test_gguf_tokenizer_encodes_like_transformers(smollm2_tokenizers):
    ours, theirs = smollm2_tokenizers
    assert ours.vocab_size == len(theirs)
    for text in VARIED_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids) == text
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_gguf_chat_template_renders_like_transformers(smollm2_tokenizers, messages):
    ours, theirs = smollm2_tokenizers
    for add_generation_prompt in (True, False):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_sentencepiece_style_gguf_vocabulary_encodes_like_transformers_llama_tokenizer():
    transformers = pytest.importorskip("transformers")
    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)],
              "▁", "▁t", "▁th", "▁the", "he", "▁a", "▁c", "at", "▁cat", "▁sat", "▁o", "▁on", "▁m", "▁mat",
              "e", "t", "h", "a", "c", "s", "o", "n", "m"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)]
    metadata = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }
    ours = read_tokenizer(metadata)
    from transformers.tokenization_utils_base import generate_merges

    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = generate_merges(vocab, dict(zip(pieces, scores, strict=True)))
    # transformers reads a GGUF sentencepiece vocabulary that states no add_bos_token as adding BOS (llama.cpp's rule).
    theirs = transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    for text in ["the cat sat on the mat", "théâtre ☕", "  the  cat", "mat\nthe"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_trained_byte_bpe_round_trips_any_unicode(text):
    assert BPE.decode(BPE.encode(text)) == text


BPE = Tokenizer.train_bpe(CORPUS, vocab_size=400)


def test_trained_bpe_has_the_requested_vocabulary_and_saves(tmp_path):
    assert BPE.vocab_size == 400
    BPE.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    text = "To be, or not to be 你好 🙂"
    assert again.encode(text) == BPE.encode(text)
    assert again.eos_token == "<|endoftext|>" and again.eos_token_id == BPE.eos_token_id


def test_char_level_tokenizer_round_trips_its_alphabet():
    texts = ["First Citizen:\nBefore we proceed", "你好，世界"]
    tokenizer = Tokenizer.char_level(texts)
    assert tokenizer.vocab_size == len(set("".join(texts)))
    for text in texts:
        ids = tokenizer.encode(text)
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text


def test_chat_template_runs_sandboxed():
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SparkGPTError, match="chat template"):
        render_chat_template(escape, [])
    with pytest.raises(SparkGPTError, match="chat template: roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [])


def test_bpe_vocabulary_too_small_is_a_clear_error():
    with pytest.raises(SparkGPTError, match="bpe vocabulary size 100 is too small"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)


def test_char_level_names_characters_outside_its_vocabulary():
    tokenizer = Tokenizer.char_level(["abc\n\ncab"])
    with pytest.raises(SparkGPTError, match="outside this character-level vocabulary: 'xz'"):
        tokenizer.encode("abzx")
