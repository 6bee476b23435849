"""One embedding path for every model kind: a decoder honours sinusoidal positions, scaled and normalised
embeddings and the absence of a final norm as the encoder models do, generates with its KV cache as its full
forward computes, and keeps GPT's checkpoint names."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import sparkgpt
from sparkgpt.generate import SamplingParams, token_steps
from sparkgpt.model import GPT, Encoder, KVCache
from sparkgpt.model.attention import rotary_cos_sin
from sparkgpt.model.decode import decode_step


def decoder(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(sparkgpt.preset("tiny-gpt2", **changes)).eval()


def block_inputs(model: GPT, input_ids: torch.Tensor, **options) -> tuple[torch.Tensor, object]:
    """What the first block receives: the embedded vectors [B, T, d] and the rotary cos/sin (or None)."""
    seen = {}

    def hook(module, args):
        seen["x"], seen["rotary"] = args[0], args[1]

    handle = model.blocks[0].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids, **options)
    finally:
        handle.remove()
    return seen["x"], seen["rotary"]


def paper_sinusoids(positions: list[int], d: int) -> torch.Tensor:
    """Vaswani et al. 2017, §3.5, written out: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    table = torch.zeros(len(positions), d, dtype=torch.float64)
    for row, pos in enumerate(positions):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            table[row, 2 * i], table[row, 2 * i + 1] = math.sin(angle), math.cos(angle)
    return table


def test_decoder_with_sinusoidal_positions_adds_the_paper_sinusoids_and_no_rotary():
    model = decoder(positions="sinusoidal")
    ids = torch.randint(0, 512, (2, 40))
    x, rotary = block_inputs(model, ids)
    assert rotary is None  # no RoPE behind the config's back
    expected = model.token_embedding.weight[ids].double() + paper_sinusoids(list(range(40)), 64)
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)
    assert "position_embedding.weight" not in model.state_dict()  # the sinusoids are computed, not learned


def test_sinusoidal_decoder_places_each_token_at_its_given_position():
    model = decoder(positions="sinusoidal")
    ids = torch.randint(0, 512, (1, 5))
    x, _ = block_inputs(model, ids, positions=torch.tensor([[0, 0, 0, 1, 2]]))  # two pads, then a 3-token text
    expected = model.token_embedding.weight[ids].double() + paper_sinusoids([0, 0, 0, 1, 2], 64)
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("changes", [
    dict(positions="sinusoidal"),
    dict(positions="sinusoidal", scale_embeddings=True, embedding_norm=True, final_norm=False),
    dict(preset="tiny-llama", scale_embeddings=True, embedding_norm=True, final_norm=False),
])
def test_incremental_decode_with_kv_cache_equals_the_full_forward(changes):
    changes = dict(changes)
    torch.manual_seed(0)
    model = GPT(sparkgpt.preset(changes.pop("preset", "tiny-gpt2"), **changes)).eval()
    ids = torch.randint(0, 512, (2, 24))
    cache = KVCache(model.config, 2, 24, torch.float32, "cpu")
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :10], cache=cache)]  # a prompt, then one token at a time
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sinusoidal_decoder_generates_as_its_full_forward_argmax():
    model = decoder(positions="sinusoidal", scale_embeddings=True)
    assert decode_step(model) is None  # the lean step computes learned/rotary positions only: the general forward
    prompts = [[5, 9, 200, 31], [7, 7]]  # ragged: the second row is left-padded
    params = SamplingParams(max_new_tokens=8, temperature=0)
    generated = torch.stack(list(token_steps(model, prompts, params)), dim=1).tolist()
    for prompt, tokens in zip(prompts, generated, strict=True):
        expected = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                expected.append(int(model(torch.tensor([expected]))[0, -1].argmax()))
        assert tokens == expected[len(prompt):]


def test_scale_embeddings_multiplies_token_vectors_by_sqrt_d_model():
    plain, scaled = decoder(), decoder(scale_embeddings=True)
    ids = torch.randint(0, 512, (2, 9))
    x, _ = block_inputs(scaled, ids)
    positions = scaled.position_embedding.weight[:9]
    torch.testing.assert_close(x, scaled.token_embedding.weight[ids] * math.sqrt(64) + positions)
    with torch.no_grad():
        assert not torch.allclose(plain(ids), scaled(ids))  # same weights, a different model


def test_embedding_norm_normalises_the_summed_embeddings():
    model = decoder(embedding_norm=True)
    with torch.no_grad():  # a gain and bias that are not the identity's
        model.embedding_norm.weight.uniform_(0.5, 1.5)
        model.embedding_norm.bias.uniform_(-0.5, 0.5)
    ids = torch.randint(0, 512, (2, 9))
    x, _ = block_inputs(model, ids)
    summed = model.token_embedding.weight[ids] + model.position_embedding.weight[:9]
    norm = model.embedding_norm
    torch.testing.assert_close(x, F.layer_norm(summed, (64,), norm.weight, norm.bias, norm.eps))
    assert {"embedding_norm.weight", "embedding_norm.bias"} <= set(model.state_dict())


def test_without_final_norm_the_head_reads_the_last_block_directly():
    model = decoder(final_norm=False)
    assert not any(name.startswith("final_norm.") for name in model.state_dict())
    last = {}
    model.blocks[-1].register_forward_hook(lambda module, args, output: last.update(x=output))
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        logits = model(ids)
        torch.testing.assert_close(logits, last["x"] @ model.lm_head.weight.T)
        torch.testing.assert_close(model.hidden_states(ids), last["x"])


@pytest.mark.parametrize("changes", [
    dict(), dict(positions="sinusoidal"), dict(embedding_norm=True), dict(final_norm=False),
    dict(type_vocab_size=2, scale_embeddings=True), dict(preset="tiny-llama", embedding_norm=True, final_norm=False),
])
def test_decoder_parameter_count_equals_the_config_estimate(changes):
    changes = dict(changes)
    config = sparkgpt.preset(changes.pop("preset", "tiny-gpt2"), **changes)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_parameters() == config.num_parameters()


def test_default_decoders_embed_exactly_as_before():
    """GPT-2: E[token] + P[position], nothing more; Llama: E[token], the positions in rotary cos/sin. Bit for bit."""
    gpt2, llama = decoder(), GPT(sparkgpt.preset("tiny-llama")).eval()
    ids = torch.randint(0, 512, (2, 9))
    x, rotary = block_inputs(gpt2, ids)
    assert rotary is None
    assert torch.equal(x, gpt2.token_embedding(ids) + gpt2.position_embedding(torch.arange(9).expand(2, 9)))
    x, rotary = block_inputs(llama, ids)
    assert torch.equal(x, llama.token_embedding(ids))
    cos, sin = rotary_cos_sin(torch.arange(9).expand(2, 9), llama.config.head_dim, llama.config.rope_theta)
    assert torch.equal(rotary[0], cos) and torch.equal(rotary[1], sin)


def _block_names(prefix: str, norm_params: tuple[str, ...], projection_params: tuple[str, ...],
                 projections: tuple[str, ...]) -> set[str]:
    names = {f"{prefix}.{norm}.{p}" for norm in ("attn_norm", "ffn_norm") for p in norm_params}
    return names | {f"{prefix}.{proj}.{p}" for proj in projections for p in projection_params}


@pytest.mark.parametrize("name", ["gpt2", "smollm2-135m", "llama-7b"])
def test_gpt_state_dict_names_are_unchanged(name):
    config = sparkgpt.preset(name)
    with torch.device("meta"):
        model = GPT(config)
    if config.norm == "layernorm":  # GPT-2
        top = {"token_embedding.weight", "position_embedding.weight", "final_norm.weight", "final_norm.bias"}
        block = (("weight", "bias"), ("weight", "bias"),
                 ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.up_proj", "ffn.down_proj"))
    else:  # Llama
        top = {"token_embedding.weight", "final_norm.weight"}
        block = (("weight",), ("weight",), ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                            "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"))
    expected = top | {"lm_head.weight"}
    for i in range(config.n_layers):
        expected |= _block_names(f"blocks.{i}", *block)
    assert set(model.state_dict()) == expected
    assert next(iter(model.state_dict())) == "token_embedding.weight"  # registered first, as before


def test_encoder_state_dict_names_are_unchanged():
    with torch.device("meta"):
        model = Encoder(sparkgpt.preset("tiny-bert"))
    embeddings = {name for name in model.state_dict() if name.startswith("embeddings.")}
    assert embeddings == {"embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                          "embeddings.token_type_embedding.weight", "embeddings.norm.weight", "embeddings.norm.bias"}
