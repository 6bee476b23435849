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


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2,
     "attention_factor": 1.3},
], ids=["linear", "llama3", "yarn", "yarn-options"])
def test_rope_scaling_equals_transformers_past_the_original_context_both_ways(tokenizer, tmp_path, scaling):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_theta": 10000.0, **scaling}, bos_token_id=None, eos_token_id=None,
    )
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "theirs")
    tokenizer.save(tmp_path / "theirs")
    lm = sparkgpt.load(tmp_path / "theirs", device="cpu")
    assert lm.config.rope_scaling["rope_type"] == scaling["rope_type"]
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))  # 3x the 16
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), reference(ids).logits, atol=1e-4, rtol=0)
        lm.save(tmp_path / "ours")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
        # The KV-cached decode (the lean step's rotary table included) past the original context, greedily.
        prompt = ids[0, :30]
        expected = reference.generate(prompt[None], max_new_tokens=10, do_sample=False,
                                      attention_mask=torch.ones(1, 30, dtype=torch.long))
    completion = lm.complete([prompt.tolist()], max_new_tokens=10, temperature=0)[0]
    assert completion.token_ids == expected[0, 30:].tolist()


def test_unsupported_rope_scaling_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}))
    with pytest.raises(sparkgpt.SparkGPTError, match=r"rope_type.*longrope"):
        hf.read_config(tmp_path)


def test_phi3_fused_projections_and_window_load_with_equal_logits_and_save_as_mistral(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=8,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    reference = transformers.Phi3ForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "phi3")
    lm = sparkgpt.load(tmp_path / "phi3", device="cpu")
    ids = token_batch(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), reference(ids).logits, atol=1e-4, rtol=0)
        lm.save(tmp_path / "ours")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert type(again).__name__ == "MistralForCausalLM"
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
