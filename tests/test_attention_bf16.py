"""The native bf16 attention kernel (csrc/attention_bf16.cpp) against the float32 formula, beside torch's own bf16
kernel as the yardstick of what bf16 rounding costs, and the places that dispatch to it: causal attention under
bf16 (training under autocast, bf16 prompts), the bf16 sliding window, and a compiled training step."""

from __future__ import annotations

import math
import os
import platform

import pytest
import torch
from torch.nn import functional as F

import sparkgpt
from sparkgpt import hardware
from sparkgpt.model import attention, native, sparse
from sparkgpt.model.attention import eager_attention, sdpa_attention
from sparkgpt.model.sparse import bf16_band_attention, pattern_mask


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def kernel():
    """The kernel's own tests need oneDNN's bf16 micro-kernel (AMX or AVX512-BF16, and no lower ONEDNN_MAX_CPU_ISA):
    they skip, saying why, where this CPU lacks it; the tests of the fallback below run everywhere. A missing native
    library fails (a compiler is there wherever the tests run)."""
    assert native.ops() is not None, "the native kernels did not build"
    if not native.bf16_attention_supported():
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "none")
        pytest.skip(f"no bf16 micro-kernel on this CPU ({hardware.cpu().isa}; ONEDNN_MAX_CPU_ISA {cap}): "
                    f"the fallback is tested instead")


def inputs(batch, heads, kv_heads, length, dim, seed=0):
    """q [B, H, T, d], k, v [B, H_kv, T, d] in bf16, laid out as projections leave them ([B, T, H, d] viewed)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, n, dim, generator=generator).transpose(1, 2).bfloat16()
            for n in (heads, kv_heads, kv_heads)]


CASES = [  # batch, heads, kv heads, length, head dim, window (= length: causal)
    (2, 4, 2, 77, 32, 77),  # grouped-query heads, a length no multiple of 64, the char model's head size
    (1, 9, 3, 512, 64, 512),  # SmolLM2's heads, a prompt
    (2, 3, 3, 200, 64, 50),  # a sliding window
    (1, 2, 1, 130, 96, 130),  # a head size past one 64-column panel
    (3, 2, 2, 3, 16, 3),  # shorter than one chunk
]


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "length", "dim", "window"), CASES)
def test_bf16_kernel_is_as_close_to_float32_attention_as_torchs_bf16_kernel(kernel, batch, heads, kv_heads, length,
                                                                           dim, window):
    """Forward and the three gradients, each against float32 attention of the same bf16 inputs: our error stays
    within 1.5× torch's bf16 SDPA's (plus a rounding step), for a 5% error in any of them fails this."""
    q, k, v = inputs(batch, heads, kv_heads, length, dim)
    scale = 1 / math.sqrt(dim)
    mask = pattern_mask("local", length, length, window, 1, q.device)
    grad = torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(1))

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]

    expected = run(lambda q, k, v: eager_attention(q, k, v, mask, False), torch.float32)
    ours = run(lambda q, k, v: bf16_band_attention(q, k, v, window, scale), torch.bfloat16)
    torchs = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads),
                 torch.bfloat16)
    for name, got, yardstick, reference in zip(("out", "dq", "dk", "dv"), ours, torchs, expected, strict=True):
        assert got.dtype == torch.bfloat16 and got.shape == reference.shape
        error, allowed = relative_error(got, reference), 1.5 * relative_error(yardstick, reference) + 2e-3
        assert error < allowed, f"{name}: {error:.4f} vs torch's bf16 {allowed:.4f}"


def test_bf16_kernel_copies_rows_it_cannot_read_as_words(kernel):
    """Rows at odd offsets (a row stride of d + 1) cannot be read as 32-bit pairs: the kernel copies them and gives
    what it gives for the same values laid out contiguously."""
    q, k, v = inputs(1, 2, 2, 70, 32)
    odd = [F.pad(t, (0, 1))[..., :32] for t in (q, k, v)]
    assert odd[0].stride(2) % 2 == 1
    grad = torch.randn(1, 2, 70, 32).bfloat16()
    results = []
    for leaves in ([t.contiguous() for t in (q, k, v)], odd):
        leaves = [t.requires_grad_() for t in leaves]
        out = bf16_band_attention(*leaves, 70, 1 / math.sqrt(32))
        results.append([out, *torch.autograd.grad(out, leaves, grad)])
    for expected, got in zip(*results, strict=True):
        assert torch.equal(got, expected)


def test_causal_bf16_attention_takes_the_native_kernel_under_autocast_and_for_bf16(kernel, monkeypatch):
    """Training under bf16 autocast (q, k promoted to float32 by the rotary step, v bf16) and a bf16 model's prompt
    both go through the kernel; padding masks and single decode steps do not."""
    calls = []
    monkeypatch.setattr(attention, "bf16_band_attention",
                        lambda *args: calls.append(args[3]) or bf16_band_attention(*args))
    q, k, v = inputs(2, 4, 2, 70, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q.float().requires_grad_(), k.float(), v, None, True)
    assert calls == [70] and out.dtype == torch.bfloat16
    expected = eager_attention(q.float(), k.float(), v.float(), None, True)
    assert relative_error(out, expected) < 1e-2
    sdpa_attention(q, k, v, None, True)
    assert calls == [70, 70]
    sdpa_attention(q, k, v, torch.ones(70, 70, dtype=torch.bool).tril(), False)  # a mask: torch's kernel
    sdpa_attention(q[:, :, -1:], k, v, None, False)  # one new token
    sdpa_attention(q.float(), k.float(), v.float(), None, True)  # float32 without autocast
    assert calls == [70, 70]


def test_bf16_sliding_window_takes_the_native_kernel(kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(sparse, "bf16_band_attention",
                        lambda *args: calls.append(args[3]) or bf16_band_attention(*args))
    q, k, v = inputs(1, 2, 2, 150, 16)
    out = sparse.sparse_attention(q, k, v, "local", 40)
    assert calls == [40]
    expected = eager_attention(q.float(), k.float(), v.float(), pattern_mask("local", 150, 150, 40, 1, q.device),
                               False)
    assert relative_error(out, expected) < 1e-2


def test_the_kernel_is_offered_wherever_onednn_runs_it():
    """The probe asks the micro-kernel itself, not whether the CPU has AMX: it runs on every x86 CPU with AVX512-BF16
    or AMX (AMD Zen 4 has no AMX), and not on an AVX-512 CPU without bf16, an AVX2 one, or under a lower
    ONEDNN_MAX_CPU_ISA."""
    here, cap = hardware.cpu(), os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    below = cap in ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
    runs = (native.ops() is not None and platform.machine() == "x86_64" and not below
            and (here.has("avx512_bf16") or here.has("amx_bf16")))
    assert native.bf16_attention_supported() == runs


def test_training_attention_takes_the_kernel_where_it_runs_and_float32_flash_elsewhere(monkeypatch):
    """The path actually taken on this CPU (no stand-in for the probe): the kernel where oneDNN runs it, else torch's
    float32 flash kernel on upcast inputs; either result is float32 attention to bf16 rounding."""
    kernel_calls, sdpa_dtypes = [], []
    torch_sdpa = F.scaled_dot_product_attention  # the patch below replaces it in torch.nn.functional itself

    def spy_kernel(*args):
        out = bf16_band_attention(*args)
        if out is not None:
            kernel_calls.append(args[3])
        return out

    def spy_sdpa(q, *args, **kwargs):
        sdpa_dtypes.append(q.dtype)
        return torch_sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention, "bf16_band_attention", spy_kernel)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy_sdpa)
    q, k, v = inputs(1, 2, 2, 40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q.float().requires_grad_(), k.float(), v, None, True)
    if native.bf16_attention_supported():
        assert (kernel_calls, sdpa_dtypes) == ([40], [])
    else:
        assert (kernel_calls, sdpa_dtypes) == ([], [torch.float32])
    expected = eager_attention(q.float(), k.float(), v.float(), None, True)
    assert relative_error(out, expected) < 1e-2


def test_without_the_kernel_training_attention_falls_back_to_float32(monkeypatch):
    monkeypatch.setattr(native, "bf16_attention_supported", lambda: False)
    q, k, v = inputs(1, 2, 2, 40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q.float().requires_grad_(), k.float(), v, None, True)
    expected = eager_attention(q.float(), k.float(), v.float(), None, True)
    assert relative_error(out, expected) < 1e-2


@pytest.mark.slow
def test_compiled_training_step_under_autocast_equals_the_eager_one(kernel):
    """torch.compile traces the kernel (through the output shapes native.py registers) in a training step, each
    block whole (fullgraph: the library's lookup breaks no graph), as the trainer compiles the baby-GPT preset."""
    torch.manual_seed(0)
    config = sparkgpt.ModelConfig(vocab_size=65, n_layers=2, n_heads=4, n_kv_heads=4, d_model=128, d_ff=256,
                                  max_seq_len=128, positions="rope", norm="rmsnorm", ffn="swiglu", bias=False)
    model = sparkgpt.GPT(config)
    ids = torch.randint(0, 65, (4, 128))

    def step(forward):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = step(model)
    for block in model.blocks:
        block.compile(fullgraph=True)
    compiled_loss, compiled_grads = step(model)
    torch.testing.assert_close(compiled_loss, eager_loss, atol=2e-2, rtol=0)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        assert relative_error(compiled, eager.float()) < 5e-2
