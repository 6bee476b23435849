"""Mixture of experts: Mixtral checkpoints against transformers, top-k routing, the load-balancing loss against
transformers' formula, capacity, and the trainer reporting the auxiliary loss."""

from __future__ import annotations

import json

import pytest
import torch

import sparkgpt
from sparkgpt.data import prepare
from sparkgpt.model import GPT
from sparkgpt.model.layers import MixtureOfExperts


@pytest.fixture(scope="module")
def hf_mixtral(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        rope_theta=20000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():  # random init of std 0.02 gives near-uniform routing; make the router opinionated
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("hf-mixtral")
    model.save_pretrained(directory)
    return model, directory


def test_mixtral_loads_with_equal_logits_and_equal_auxiliary_loss(hf_mixtral):
    reference, directory = hf_mixtral
    ours = sparkgpt.load(directory, device="cpu").model
    assert ours.config.n_experts == 4 and ours.config.experts_per_token == 2
    ids = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        expected = reference(ids, output_router_logits=True)
        logits = ours(ids)
    assert expected.logits.std() > 0.01
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.aux_loss, expected.aux_loss, atol=1e-5, rtol=0)


def test_auxiliary_loss_equals_the_reference_formula():
    """Switch Transformer eq. 4–6 as transformers' load_balancing_loss_func computes it, on our router logits."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    model = GPT(sparkgpt.preset("tiny-moe", n_layers=3, n_experts=6, experts_per_token=2))
    logits = []
    for block in model.blocks:
        block.ffn.router.register_forward_hook(lambda module, args, out: logits.append(out.detach()))
    model(torch.randint(0, 512, (3, 17)))
    expected = mixtral.load_balancing_loss_func(tuple(logits), 6, 2)
    torch.testing.assert_close(model.aux_loss.detach(), expected, atol=1e-6, rtol=0)
    model.aux_loss.backward()  # it trains the router
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0


def test_every_token_goes_to_exactly_k_experts_weighted_by_renormalised_router_probabilities():
    torch.manual_seed(0)
    config = sparkgpt.preset("tiny-moe", n_experts=5, experts_per_token=3)
    moe = MixtureOfExperts(config).eval()
    x = torch.randn(2, 11, config.d_model)
    seen: list[torch.Tensor] = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    out = moe(x)
    tokens = x.reshape(-1, config.d_model)
    # Each token appears in exactly k experts' inputs.
    counts = sum((tokens[:, None, :] == inputs[None, :, :]).all(-1).any(-1).long() for inputs in seen)
    assert counts.tolist() == [3] * 22
    # The output is Σ over the top-k of softmax weights renormalised to sum to one.
    probs = torch.softmax(tokens @ moe.router.weight.T, dim=-1)
    weights, chosen = probs.topk(3, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.stack([sum(w * moe.experts[e](t) for w, e in zip(ws, es, strict=True))
                            for t, ws, es in zip(tokens, weights, chosen.tolist(), strict=True)])
    torch.testing.assert_close(out.reshape(-1, config.d_model), expected, atol=1e-5, rtol=0)


def test_capacity_factor_caps_tokens_per_expert():
    torch.manual_seed(0)
    config = sparkgpt.preset("tiny-moe", n_experts=4, experts_per_token=2, expert_capacity_factor=0.5)
    moe = MixtureOfExperts(config)
    sizes: list[int] = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    moe(torch.randn(1, 40, config.d_model))
    assert max(sizes) <= 10  # ⌈0.5 · 40 · 2 / 4⌉


@pytest.mark.slow
def test_trainer_reports_the_auxiliary_loss(tmp_path):
    from sparkgpt.train import train

    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 200, encoding="utf-8")
    prepare([tmp_path / "corpus.txt"], tmp_path / "data", tokenizer="char", workers=1, progress=False)
    run = tmp_path / "run"
    overrides = {"data": str(tmp_path / "data"), "max_steps": "6", "block_size": "32", "batch_size": "4",
                 "log_every": "2", "eval_every": "6", "eval_batches": "1", "save_every": "6", "warmup_steps": "1",
                 "dtype": "float32", "model.d_model": "32", "model.n_layers": "2", "model.d_ff": "48"}
    train("shakespeare-moe", run, overrides, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    aux = [row["aux_loss"] for row in rows if row["kind"] == "train"]
    assert len(aux) == 3 and all(1.9 < a < 4.0 for a in aux)  # k = 2 when balanced, E = 4 at worst
    lm = sparkgpt.load(run, device="cpu")
    assert lm.config.n_experts == 4
