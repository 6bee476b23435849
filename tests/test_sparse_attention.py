"""Sparse attention: every pattern's fast path against the masked dense reference, GPT-Neo's local layers against
transformers, and KV-cached decoding (a sliding-window ring past the window) against the full forward."""

from __future__ import annotations

import pytest
import torch

import sparkgpt
from sparkgpt.model import GPT, KVCache, native
from sparkgpt.model.attention import eager_attention
from sparkgpt.model.sparse import block_sparse_attention, pattern_mask, sparse_attention

CASES = [  # pattern, window, length, summary
    ("local", 16, 100, 1), ("local", 7, 64, 1), ("local", 1, 40, 1), ("local", 130, 300, 1),
    ("local", 300, 310, 1),  # every chunk's window reaches before position 0
    ("strided", 8, 100, 1), ("strided", 5, 77, 1), ("fixed", 8, 100, 2), ("fixed", 16, 150, 1), ("dense", 8, 50, 1),
]


@pytest.mark.parametrize(("pattern", "window", "length", "summary"), CASES)
@pytest.mark.parametrize("fast_path", ["dispatch", "without_native", "block_sparse"])
def test_fast_path_equals_masked_reference_forward_and_gradients(pattern, window, length, summary, fast_path,
                                                                 monkeypatch):
    """dispatch: what `sparse_attention` picks (the native band kernel for local float32 on the CPU, built in CI);
    without_native: the same with the native library unavailable (the flash-kernel chunks)."""
    if fast_path == "without_native":
        monkeypatch.setattr(native, "ops", lambda: None)
    elif pattern == "local" and fast_path == "dispatch":
        assert native.ops() is not None, "the native kernels did not build"
    torch.manual_seed(0)
    q = torch.randn(2, 4, length, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, length, 16, requires_grad=True) for _ in range(2))  # grouped-query: 2 kv heads
    mask = pattern_mask(pattern, length, length, window, summary, q.device)
    expected = eager_attention(q, k, v, mask, False)
    if fast_path != "block_sparse":
        got = sparse_attention(q, k, v, pattern, window, summary)
    else:
        group = q.shape[1] // k.shape[1]
        got = block_sparse_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), pattern,
                                     window, summary, block=16)
    grad = torch.randn_like(expected)
    for ours, reference in zip(torch.autograd.grad(got, (q, k, v), grad),
                               torch.autograd.grad(expected, (q, k, v), grad), strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_native", [True, False])
def test_local_fast_path_with_explicit_scale_and_batch(with_native, monkeypatch):
    if not with_native:
        monkeypatch.setattr(native, "ops", lambda: None)
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 200, 8, requires_grad=True) for _ in range(3))
    mask = pattern_mask("local", 200, 200, 40, 1, q.device)
    expected = eager_attention(q, k, v, mask, False, scale=1.0)
    got = sparse_attention(q, k, v, "local", 40, scale=1.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    for ours, reference in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_compiled_local_attention_equals_masked_reference():
    """torch.compile traces the native band kernel through the output shapes native.py registers for it."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, "local", 40).square().sum())
    got = compiled(q, k, v)
    expected = eager_attention(q, k, v, pattern_mask("local", 200, 200, 40, 1, q.device), False).square().sum()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-5)
    for ours, reference in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(expected, (q, k, v)),
                               strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def hf_gpt_neo(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(
        vocab_size=320, hidden_size=64, num_layers=4, num_heads=4, max_position_embeddings=256, window_size=16,
        attention_types=[[["global", "local"], 2]], bos_token_id=None, eos_token_id=None,
    )
    model = transformers.GPTNeoForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("hf-gpt-neo")
    model.save_pretrained(directory)
    return model, directory


def test_gpt_neo_with_alternating_global_and_local_layers_loads_with_equal_logits(hf_gpt_neo):
    reference, directory = hf_gpt_neo
    ours = sparkgpt.load(directory, device="cpu").model
    assert ours.config.layer_patterns() == ["dense", "local", "dense", "local"]
    ids = torch.randint(0, 320, (2, 100))  # far past the window of 16
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_gpt_neo_saves_back_for_transformers(hf_gpt_neo, tmp_path):
    transformers = pytest.importorskip("transformers")
    reference, directory = hf_gpt_neo
    lm = sparkgpt.load(directory, device="cpu")
    lm.save(tmp_path / "neo")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "neo").eval()
    ids = torch.randint(0, 320, (1, 60))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("patterns", [["dense", "local"], ["local"], ["strided", "fixed"]])
def test_cached_decoding_past_the_window_equals_the_full_forward(patterns):
    torch.manual_seed(0)
    config = sparkgpt.preset("tiny-llama", attention_patterns=patterns, attention_window=8, fixed_summary=2)
    model = GPT(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(config, 2, 40, torch.float32, torch.device("cpu"))
        steps = [model(ids[:, :13], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(13, 40)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
        cache = KVCache(config, 2, 40, torch.float32, torch.device("cpu"))  # prefill in two chunks
        chunks = torch.cat([model(ids[:, :20], cache=cache), model(ids[:, 20:], cache=cache)], dim=1)
        torch.testing.assert_close(chunks, full, atol=1e-5, rtol=0)
    if "local" in patterns:  # the window's ring holds only what the window needs
        assert cache.window_keys.shape[3] == 8 and cache.keys.shape[0] == patterns.count("dense") * (2 // len(patterns))


def test_ragged_batch_generation_equals_each_prompt_alone():
    torch.manual_seed(0)
    config = sparkgpt.preset("tiny-sparse", attention_window=4)
    model = GPT(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 30))
    padding = torch.ones(2, 30, dtype=torch.long)
    padding[0, :7] = 0
    positions = (padding.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(ids, positions=positions, attention_mask=padding)
        torch.testing.assert_close(batch[0, 7:], model(ids[:1, 7:])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch[1], model(ids[1:])[0], atol=1e-5, rtol=0)


def test_greedy_generation_equals_transformers(hf_gpt_neo):
    reference, directory = hf_gpt_neo
    model = sparkgpt.load(directory, device="cpu").model
    from sparkgpt.generate import SamplingParams, token_steps

    prompt = torch.randint(0, 320, (1, 10))
    ours = torch.stack(list(token_steps(model, [prompt[0].tolist()], SamplingParams(max_new_tokens=30,
                                                                                     temperature=0))), dim=1)
    with torch.no_grad():
        theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                                    do_sample=False, pad_token_id=0)
    assert ours[0].tolist() == theirs[0, 10:].tolist()


def test_bad_pattern_is_one_line_error():
    with pytest.raises(sparkgpt.SparkGPTError, match="attention_patterns"):
        sparkgpt.preset("tiny-gpt2", attention_patterns=["dense", "diagonal"])
