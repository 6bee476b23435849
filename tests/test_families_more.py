"""More transformers families and rope kinds, both ways: Gemma 2 (soft-capped scores and logits, alternating
sliding-window and global layers), Llama with dynamic NTK rope and Phi-3 with longrope. Each is a tiny random model
that transformers saves; sparkgpt loads it with fp32 logits within 1e-4, decodes greedily through the KV cache to
the same tokens, and saves it back for transformers to read with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparkgpt

transformers = pytest.importorskip("transformers")


def fresh(directory: Path):
    """transformers' model as saved: dynamic rope keeps state between forwards (the longest length seen so far),
    so each comparison starts from a freshly loaded one."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def batch(vocab_size: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(length))


def check_both_ways(directory: Path, tmp_path: Path, lengths: list[int], prompts: list[tuple[int, int]],
                    saved_as: str) -> sparkgpt.LM:
    """Logits at each length, greedy tokens for each (prompt length, new tokens), and the checkpoint saved back."""
    lm = sparkgpt.load(directory, device="cpu")
    vocab = lm.config.vocab_size
    lm.save(tmp_path / "ours")
    for length in lengths:
        ids = batch(vocab, length)
        with torch.no_grad():
            expected = fresh(directory)(ids).logits
            torch.testing.assert_close(lm.model(ids), expected, atol=1e-4, rtol=0)
            again = fresh(tmp_path / "ours")
            assert type(again).__name__ == saved_as
            torch.testing.assert_close(again(ids).logits, expected, atol=1e-4, rtol=0)
    for prompt_length, new_tokens in prompts:
        prompt = batch(vocab, prompt_length)[0]
        expected = fresh(directory).generate(prompt[None], max_new_tokens=new_tokens, do_sample=False,
                                             attention_mask=torch.ones(1, prompt_length, dtype=torch.long))
        completion = lm.complete([prompt.tolist()], max_new_tokens=new_tokens, temperature=0)[0]
        assert completion.token_ids == expected[0, prompt_length:].tolist()
    return lm


def tiny_gemma2(vocab_size: int, query_pre_attn_scalar: int, sliding_window: int) -> torch.nn.Module:
    """A tiny random transformers Gemma 2 whose soft caps (2 and 3) bite, its norms made to count."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=query_pre_attn_scalar,
        max_position_embeddings=256, sliding_window=sliding_window, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    reference = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma's norms start at w = 0 (a scale of 1): make them count
        for name, param in reference.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    return reference


def test_gemma2_softcaps_sandwich_norms_and_alternating_windows_equal_transformers_both_ways(tokenizer, tmp_path):
    reference = tiny_gemma2(tokenizer.vocab_size, query_pre_attn_scalar=24, sliding_window=6)
    config = reference.config
    reference.save_pretrained(tmp_path / "gemma2")
    tokenizer.save(tmp_path / "gemma2")
    ids = batch(config.vocab_size, 24)
    with torch.no_grad():  # both caps bite at this scale: without either, the logits move well past 1e-4
        capped = reference(ids).logits
        reference.config.final_logit_softcapping = None
        assert (reference(ids).logits - capped).abs().max() > 0.05
        reference.config.final_logit_softcapping = 3.0
        for layer in reference.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (reference(ids).logits - capped).abs().max() > 0.05
    lm = check_both_ways(tmp_path / "gemma2", tmp_path, [24], [(16, 8)], "Gemma2ForCausalLM")
    config = lm.config
    assert config.layer_patterns() == ["local", "dense"] * 2 and config.attention_window == 6
    assert (config.attn_logit_softcap, config.final_logit_softcap, config.rope_local_theta) == (2.0, 3.0, None)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (saved["model_type"], saved["attn_logit_softcapping"], saved["final_logit_softcapping"]) == \
        ("gemma2", 2.0, 3.0)


def test_dynamic_ntk_rope_equals_transformers_past_the_original_context_both_ways(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
        initializer_range=0.1,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
        bos_token_id=None, eos_token_id=None,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "llama")
    tokenizer.save(tmp_path / "llama")
    # 40 tokens: 2.5x the 16 the base grows past. Greedy from 12 tokens crosses 16 during decoding (each step's
    # base grows, keys already cached keep theirs, as in transformers); from 20, decoding starts past it.
    lm = check_both_ways(tmp_path / "llama", tmp_path, [12, 40], [(12, 10), (20, 10)], "LlamaForCausalLM")
    assert lm.config.rope_scaling == {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16}
    assert lm.config.max_seq_len == 64  # the factor times longer context the scaling is for
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["max_position_embeddings"] == 16


def test_phi3_longrope_short_and_long_factors_equal_transformers_both_ways(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=16,
        initializer_range=0.1,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [1.0 + 2.0 * i for i in range(8)]},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    transformers.Phi3ForCausalLM(config).eval().save_pretrained(tmp_path / "phi3")
    tokenizer.save(tmp_path / "phi3")
    # Within the original 16 the short factors turn q and k, past it the long ones (and both scale by
    # √(1 + ln 4 / ln 16), factor 64 / 16); Phi-3 is written back as Llama, which transformers reads the same.
    lm = check_both_ways(tmp_path / "phi3", tmp_path, [12, 40], [(8, 6), (24, 8)], "LlamaForCausalLM")
    assert lm.config.rope_scaling["factor"] == 4.0
    assert lm.config.rope_scaling["original_max_position_embeddings"] == 16


@pytest.mark.parametrize("changes, field", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 0.5, "original_max_position_embeddings": 16}},
     "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16,
                       "beta_fast": 4}}, "dynamic with beta_fast"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 16,
                       "short_factor": [1.0] * 8, "long_factor": [1.0] * 7}}, "rope_scaling.long_factor"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 16,
                       "short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "attention_factor": -1}},
     "rope_scaling.attention_factor"),
    ({"attn_logit_softcap": 0.0}, "attn_logit_softcap"),
    ({"final_logit_softcap": "30"}, "final_logit_softcap"),
], ids=["dynamic-factor", "dynamic-original", "dynamic-unknown", "longrope-length", "longrope-attention",
        "attn-softcap", "final-softcap"])
def test_bad_rope_scaling_and_softcaps_are_one_line_errors_naming_the_field(changes, field):
    with pytest.raises(sparkgpt.SparkGPTError, match=field) as error:
        sparkgpt.preset("tiny-llama", **changes)  # head_dim 16: 8 factors per list
    assert "\n" not in str(error.value)
