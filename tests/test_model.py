"""The Transformer itself: attention against torch's reference modules, the KV cache, ragged batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparkgpt
from sparkgpt.model import GPT, KVCache
from sparkgpt.model.attention import eager_attention, sdpa_attention

CONFIGS = {
    "gpt2": sparkgpt.preset("tiny-gpt2"),
    "llama-gqa": sparkgpt.preset("tiny-llama"),
}


@pytest.fixture(params=list(CONFIGS))
def model(request) -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIGS[request.param]).eval()


def test_multi_head_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    config = sparkgpt.preset("tiny-gpt2")
    ours = GPT(config).blocks[0].attn.eval()
    reference = nn.MultiheadAttention(config.d_model, config.n_heads, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        reference.out_proj.weight.copy_(ours.o_proj.weight)
        reference.out_proj.bias.copy_(ours.o_proj.bias)
        x = torch.randn(2, 10, config.d_model)
        future = torch.ones(10, 10, dtype=torch.bool).triu(1)
        expected, _ = reference(x, x, x, attn_mask=future, need_weights=False)
        torch.testing.assert_close(ours(x, None, None, True, None), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("q_len", [1, 7])
def test_sdpa_fast_path_equals_eager_reference(kv_heads, q_len):
    torch.manual_seed(0)
    q = torch.randn(2, 4, q_len, 16)
    k, v = torch.randn(2, kv_heads, 9, 16), torch.randn(2, kv_heads, 9, 16)
    mask = torch.rand(2, 1, q_len, 9) > 0.3
    mask[..., 0] = True
    for args in ((None, False), (mask, False)):
        torch.testing.assert_close(sdpa_attention(q, k, v, *args), eager_attention(q, k, v, *args), atol=1e-5, rtol=0)
    square = q[:, :, :, :], k[:, :, :q_len], v[:, :, :q_len]
    torch.testing.assert_close(sdpa_attention(*square, None, True), eager_attention(*square, None, True), atol=1e-5,
                               rtol=0)


def test_eager_backend_gives_the_same_logits(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    eager = GPT(model.config.replace(attention_backend="eager")).eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(eager(ids), model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_incremental_decoding_equals_full_forward(model, chunk):
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    cache = KVCache(model.config, batch_size=2, capacity=21, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, start:start + chunk], cache=cache) for start in range(0, 21, chunk)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_gives_each_prompt_its_own_logits(model):
    torch.manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,)) for n in (5, 12, 9)]
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    padding = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        padding[row, longest - len(prompt):] = 1
    positions = (padding.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, positions=positions, attention_mask=padding)
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None])
            torch.testing.assert_close(batched[row, longest - len(prompt):], alone[0], atol=1e-5, rtol=0)


def test_parameter_count_matches_the_config_formula(model):
    assert model.num_parameters() == model.config.num_parameters()


@pytest.mark.parametrize("name", ["gpt2", "smollm2-135m"])
def test_preset_parameter_counts_match_transformers(name):
    transformers = pytest.importorskip("transformers")
    from sparkgpt.checkpoint.hf import config_to_hf

    config = sparkgpt.preset(name)
    hf_fields = config_to_hf(config, torch.float32)
    hf_config = transformers.AutoConfig.for_model(hf_fields.pop("model_type"), **hf_fields)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert config.num_parameters() == reference.num_parameters()


def test_too_long_input_is_refused(model):
    ids = torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(ids)
