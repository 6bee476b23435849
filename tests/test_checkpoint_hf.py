"""HF-compatible checkpoints both ways: transformers -> sparkgpt -> transformers, logits equal within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

import sparkgpt
from sparkgpt.checkpoint import hf

transformers = pytest.importorskip("transformers")


def token_batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def test_transformers_checkpoint_loads_with_equal_logits(hf_reference):
    reference, directory = hf_reference
    lm = sparkgpt.load(directory, device="cpu")
    ids = token_batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
        actual = lm.model(ids)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_saved_checkpoint_loads_back_into_transformers(hf_reference, tmp_path):
    reference, directory = hf_reference
    lm = sparkgpt.load(directory, device="cpu")
    lm.save(tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is type(reference)
    ids = token_batch(reference.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    assert (tmp_path / "ours" / "tokenizer.json").is_file()


def test_sharded_checkpoint_loads(hf_llama, tmp_path):
    reference, _ = hf_llama
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = hf.load_model(tmp_path)
    ids = token_batch(reference.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_config_without_transformers_family_round_trips(tmp_path, tokenizer):
    # RoPE with LayerNorm and GELU is no transformers family: it is saved as our own model_type.
    config = sparkgpt.preset("tiny-gpt2", positions="rope", vocab_size=tokenizer.vocab_size)
    lm = sparkgpt.LM(sparkgpt.GPT(config).eval(), tokenizer)
    lm.save(tmp_path / "own")
    assert json.loads((tmp_path / "own" / "config.json").read_text())["model_type"] == "sparkgpt"
    again = sparkgpt.load(tmp_path / "own", device="cpu")
    ids = token_batch(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), lm.model(ids), atol=0, rtol=0)


def test_bfloat16_load(hf_llama):
    reference, directory = hf_llama
    lm = sparkgpt.load(directory, dtype="bfloat16", device="cpu")
    assert lm.model.lm_head.weight.dtype == torch.bfloat16
    ids = token_batch(reference.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).float(), reference(ids).logits, atol=0.1, rtol=0.05)


def test_save_refuses_to_overwrite_a_folder_that_is_not_a_checkpoint(tmp_path, tokenizer):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    lm = sparkgpt.LM(sparkgpt.GPT(sparkgpt.preset("tiny-gpt2", vocab_size=tokenizer.vocab_size)), tokenizer)
    with pytest.raises(sparkgpt.SparkGPTError, match="refusing to overwrite"):
        lm.save(precious)
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_save_replaces_an_older_checkpoint_atomically(tmp_path, tokenizer):
    config = sparkgpt.preset("tiny-gpt2", vocab_size=tokenizer.vocab_size)
    first, second = (sparkgpt.LM(sparkgpt.GPT(config), tokenizer) for _ in range(2))
    first.save(tmp_path / "ckpt")
    second.save(tmp_path / "ckpt")
    loaded = sparkgpt.load(tmp_path / "ckpt", device="cpu")
    torch.testing.assert_close(loaded.model.lm_head.weight, second.model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left behind
