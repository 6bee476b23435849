"""The native (C++) kernels against their PyTorch versions and the model's own forward: the decode step's layers
in one call (csrc/decode_layers.cpp) and the one-pass dequantisation (csrc/dequantize.cpp)."""

from __future__ import annotations

import copy
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

import pytest
import torch

import sparkgpt
from sparkgpt import hardware
from sparkgpt.model import KVCache, native, quant
from sparkgpt.model.decode import DecodeStep
from sparkgpt.model.quant import KERNELS, QuantizedLinear, quantize_model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.fixture(scope="module")
def ops():
    """The native library; the tests fail (never skip) where it cannot be built: CI has a compiler."""
    built = native.ops()
    assert built is not None, "the native kernels did not build (see the warning): a C++ compiler and ninja needed"
    return built


@pytest.mark.parametrize(("method", "group_size"), [("int8", 0), ("int4", 32), ("int4", 64)])
def test_native_dequantization_equals_the_float32_matrix_rounded_once(ops, method, group_size):
    torch.manual_seed(0)
    weight = torch.randn(96, 192) * torch.logspace(-2, 1, 192)  # columns of very different sizes
    tensors = quant.quantize_int8(weight) if method == "int8" else quant.quantize_int4(weight, group_size)
    expected = quant.dequantize(method, tensors, torch.float32).to(torch.bfloat16)
    if method == "int8":
        actual = ops.dequantize_int8(tensors["qweight"], tensors["scales"])
    else:
        actual = ops.dequantize_int4(tensors["qweight"], tensors["scales"], tensors["zeros"], group_size)
    assert torch.equal(actual, expected)
    assert torch.equal(quant.dequantize(method, tensors, torch.bfloat16), expected)  # the path prompts take


GEMMA_LIKE = dict(qk_norm=True, sandwich_norm=True, ffn="geglu", scale_embeddings=True, rope_theta=1e6,
                  rope_local_theta=10_000.0, attention_patterns=["local", "dense"], attention_window=8,
                  attention_scale=24 ** -0.5)


def tiny_llama(method: str, dtype: torch.dtype, head_dim: int | None = None, gemma: bool = False) -> torch.nn.Module:
    """A quantised Llama-shaped model whose every projection has an integer kernel (int8's needs multiples of 64).
    Under int4 the down projections are int8 (re-quantised from their int4 values), so blocks mix both kernels.
    `head_dim` 64 makes the heads 256 wide in all against d_model 128. `gemma` adds Gemma 3's parts: q/k and
    sandwich norms (gains drawn at random, so that no two are interchangeable), GeGLU, embeddings × √d, a query
    scale of its own, and a sliding-window first layer (window 8) turning at its own rope base."""
    torch.manual_seed(0)
    config = sparkgpt.ModelConfig(**{**dict(
        vocab_size=320, n_layers=2, n_heads=4, n_kv_heads=2, d_model=128, d_ff=192, head_dim=head_dim,
        max_seq_len=64, positions="rope", norm="rmsnorm", ffn="swiglu", bias=False, initializer_range=0.2),
        **(GEMMA_LIKE if gemma else {})})
    model = sparkgpt.GPT(config).eval()
    for module in model.modules():
        if isinstance(module, sparkgpt.model.layers.RMSNorm):
            module.weight.data.uniform_(0.5, 1.5)
    model = quantize_model(model.to(dtype), method)
    if method == "int4":
        for block in model.blocks:
            linear = torch.nn.Linear(192, 128, bias=False)
            linear.weight.data = block.ffn.down_proj.dequantize()
            block.ffn.down_proj = QuantizedLinear.from_linear(linear, "int8", int8_activations=True)
    return model


@pytest.mark.parametrize(("method", "dtype", "head_dim", "gemma"), [
    ("int8", torch.float32, None, False), ("int8", torch.bfloat16, None, False), ("int4", torch.float32, None, False),
    ("int4", torch.bfloat16, None, False), ("int8", torch.float32, 64, False), ("int4", torch.float32, None, True),
    ("int8", torch.bfloat16, None, True)])
@torch.inference_mode()
def test_native_decode_layers_equal_the_python_step_and_follow_the_forward(ops, method, dtype, head_dim, gemma):
    """A ragged batch (left padding, a mask) decoded 7 tokens after a 5-token prefill: at each step, from the same
    cache, the native step's logits and cache writes equal the Python step's to rounding, and both follow the
    whole-sequence forward as closely. The Gemma-like model's sliding-window layer fills its ring (8 columns)
    and wraps it."""
    model = tiny_llama(method, dtype, head_dim, gemma)
    fast = DecodeStep(model)
    assert fast.native is not None
    slow = DecodeStep(model)
    slow.native = None
    block = model.blocks[0]  # o_proj int4 or int8, down_proj int8: the kernels chosen for this CPU
    assert set(fast.native[2]) == {KERNELS[block.attn.o_proj.kernel_name], KERNELS[block.ffn.down_proj.kernel_name]}
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :3] = 0
    positions = (padding.cumsum(dim=1) - 1).clamp(min=0)
    full = model(ids, positions=positions, attention_mask=padding)
    cache = KVCache(model.config, 2, 12, dtype, torch.device("cpu"))
    model(ids[:, :5], positions=positions[:, :5], attention_mask=padding[:, :5], cache=cache)
    mask = padding.bool()[:, None, None, :]
    # Both round each kernel input to bf16: where their float32 sums differ in the last bit (the native attention's
    # vectorised order and e^x against SDPA's), a rounding can fall the other way and move this tiny random model's
    # logits by up to about 1%; bf16 caches add the Python step's bf16 rotary products. A 5% error in the attention
    # scale fails every case (checked).
    same = 2e-2 if dtype == torch.float32 else 0.05
    for t in range(5, 12):
        python_cache = copy.deepcopy(cache)
        ours = fast(ids[:, t], positions[:, t], cache, mask[..., : t + 1])
        reference = slow(ids[:, t], positions[:, t], python_cache, mask[..., : t + 1])
        assert cache.length == python_cache.length == t + 1
        assert relative_error(ours, reference) < same
        assert relative_error(cache.keys[:, :, :, t], python_cache.keys[:, :, :, t]) < same
        assert relative_error(cache.values[:, :, :, t], python_cache.values[:, :, :, t]) < same
        if gemma:
            ring = t % model.config.attention_window
            assert relative_error(cache.window_keys[:, :, :, ring], python_cache.window_keys[:, :, :, ring]) < same
            assert relative_error(cache.window_values[:, :, :, ring],
                                  python_cache.window_values[:, :, :, ring]) < same
            assert torch.equal(cache.window_positions, python_cache.window_positions)
        for row in range(2):
            assert relative_error(ours[row], full[row, t]) < 2 * relative_error(reference[row], full[row, t]) + 1e-3


@torch.inference_mode()
@pytest.mark.parametrize(("head_dim", "dtype"), [(None, torch.float32), (80, torch.bfloat16), (256, torch.float32)])
def test_native_decode_attention_over_many_columns_equals_the_python_step(ops, head_dim, dtype):
    """Past 16 cached columns the native step takes its scores sixteen keys at a time (`dot_rows`) and its values'
    sums in registers, 128 columns of a head at a time (`weighted_sum`): at 37 and 53 cached columns (two blocks of
    16 and a tail, three and a tail), for heads of 32, 80 (no multiple of 16) and 256 (two chunks) values, float32
    and bf16 caches, its logits equal the Python step's to rounding."""
    model = tiny_llama("int8", dtype, head_dim, False)
    fast, slow = DecodeStep(model), DecodeStep(model)
    assert fast.native is not None
    slow.native = None
    ids = torch.randint(0, model.config.vocab_size, (2, 54), generator=torch.Generator().manual_seed(1))
    for length in (36, 52):
        cache = KVCache(model.config, 2, 54, dtype, torch.device("cpu"))
        model(ids[:, :length], cache=cache)
        python_cache = copy.deepcopy(cache)
        mask = torch.ones(2, 1, 1, length + 1, dtype=torch.bool)
        position = torch.full((2,), length)
        ours = fast(ids[:, length], position, cache, mask)
        reference = slow(ids[:, length], position, python_cache, mask)
        assert relative_error(ours, reference) < (2e-2 if dtype == torch.float32 else 0.05)


@torch.inference_mode()
def test_a_native_decode_row_is_bit_for_bit_the_same_whatever_columns_past_it_the_step_reads(ops):
    """A draft being checked makes the step read past a row's own position (to the batch's longest), masked: the
    row's logits must not change by a bit, or the greedy text of speculative decoding would drift from plain
    decoding's (scores are reduced sixteen columns at a time, whichever block a column falls in). Every position
    from 17 to 63, each read to spans past it: a last bit that differs anywhere survives the bf16 roundings
    somewhere."""
    model = tiny_llama("int4", torch.float32, 64, False)
    step = DecodeStep(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, 1, 80, torch.float32, torch.device("cpu"))
    model(ids[:, :17], cache=cache)
    for position in range(17, 64):
        junk = copy.deepcopy(cache)  # other rows' columns past this one: never seen by it
        junk.keys[:, :, :, position + 1:].normal_()
        junk.values[:, :, :, position + 1:].normal_()
        token = ids[:, position]
        own = step(token, torch.tensor([position]), cache, torch.ones(1, 1, 1, position + 1, dtype=torch.bool))
        for span in (position + 2, position + 9, 80):
            wider = copy.deepcopy(junk)  # as the engine's slot cache gives it: this row writes `position`, reads `span`
            wider.write_columns = lambda batch, span=span, position=position: (torch.tensor([position]), span, None)
            mask = torch.zeros(1, 1, 1, span, dtype=torch.bool)
            mask[..., :position + 1] = True
            assert torch.equal(step(token, torch.tensor([position]), wider, mask), own), (position, span)


def test_a_sliding_window_prompt_runs_under_inference_mode(ops):
    """torch.inference_mode makes the native local attention's output an inference tensor, which the intra-op
    pool's threads (not in that mode themselves) once refused to write: a Gemma prompt past its window crashed."""
    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread runs the kernel in the caller's own mode")
    model = tiny_llama("int4", torch.float32, None, True)  # window 8
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids)
    with torch.inference_mode():
        assert torch.equal(model(ids), expected)


def test_native_kernels_can_be_turned_off():
    script = "from sparkgpt.model import native; print(native.ops() is None)"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SPARKGPT_NATIVE": "0"})
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr


# CPU classes one machine can stand in for: compiler flags for its loops, and oneDNN capped at its ISA. Each row:
# (flags, ONEDNN_MAX_CPU_ISA, the features the host needs to run that build, the loops compiled, bf16 kernel?)
# The lesser classes build at -O1: the same loops and intrinsics as -O3 (neither reorders float arithmetic), in
# less of the suite's time; the class this CPU is builds as users get it.
CPU_CLASSES = {
    "avx2-laptop": ("-O1 -march=x86-64-v3", "AVX2", ("avx2", "fma"), "portable", False),
    "avx512-without-bf16": ("-O1 -march=skylake-avx512", "AVX512_CORE", ("avx512f", "avx512bw", "avx512vl",
                                                                           "avx512dq", "avx512cd"), "AVX-512", False),
    "avx512-bf16-without-amx": ("-O3 -march=native", "AVX512_CORE_BF16", ("avx512f", "avx512bw", "avx512_bf16"),
                                "AVX-512 with AVX512-BF16", True),
}


def test_without_a_compiler_the_pytorch_paths_run(tmp_path):
    """A machine with no C++ compiler (CXX names none, and no build is cached) warns once and generates through the
    PyTorch versions of every kernel."""
    script = textwrap.dedent("""
        import warnings
        import sparkgpt
        from sparkgpt.generate import SamplingParams, token_steps
        from sparkgpt.model import native
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            missing = native.ops() is None
        config = sparkgpt.ModelConfig(vocab_size=50, n_layers=1, n_heads=2, d_model=32, max_seq_len=16,
                                      positions="rope", norm="rmsnorm", ffn="swiglu", bias=False)
        steps = token_steps(sparkgpt.GPT(config).eval(), [[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0))
        print(missing, sum("native kernels unavailable" in str(w.message) for w in caught), len(list(steps)))
    """)
    env = {**os.environ, "CXX": "no-such-compiler", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stdout.split() == ["True", "1", "4"], run.stdout + run.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the flags and oneDNN ISA names below are x86-64's")
@pytest.mark.parametrize("cpu_class", list(CPU_CLASSES))
def test_a_lesser_cpu_class_builds_takes_its_paths_and_passes_the_same_tests(cpu_class):
    """This machine stands in for a lesser CPU: the native loops built for it (an AVX2 laptop gets the portable
    ones) and oneDNN capped at its ISA (no AMX, or no bf16 micro-kernel at all). In a fresh process, the build
    reports the loops it compiled and whether the bf16 attention kernel runs, and this file's tests, the sliding
    window's and the bf16 attention's (kernel or fallback, whichever that class takes) pass."""
    flags, isa, needs, loops, kernel = CPU_CLASSES[cpu_class]
    if not hardware.cpu().has(*needs):
        pytest.skip(f"this CPU lacks {', '.join(needs)}: it cannot run a build for {cpu_class}")
    env = {**os.environ, "SPARKGPT_NATIVE_CFLAGS": flags, "ONEDNN_MAX_CPU_ISA": isa}
    probe = ("import sys; sys.path.insert(0, 'tests'); from test_native import int4_digest; "
             "from sparkgpt.model import native; "
             "print(native.ops().compiled_loops(), native.bf16_attention_supported(), int4_digest())")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=900, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    # the int4 product's bits are this machine's build's, whichever loops (VNNI or portable) it compiled
    assert run.returncode == 0 and run.stdout.strip() == f"{loops} {kernel} {int4_digest()}", (
        run.stdout + run.stderr[-3000:])
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__,
                          "tests/test_sparse_attention.py", "tests/test_attention_bf16.py", "-m", "not slow",
                          "-k", "native or local or bf16 or attention"],
                         capture_output=True, text=True, timeout=900, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
    assert ("no bf16 micro-kernel" in run.stdout) != kernel  # its own tests skip exactly where it does not run


@pytest.mark.slow
def test_native_sources_compile_for_aarch64():
    """Apple Silicon and Graviton users get the portable loops: every source compiles for aarch64 with Debian's
    cross compiler (compile only: torch's headers are the same on every architecture; Python's host headers stand
    in for the target's). CI installs the compiler (.ci/run), so there a missing one fails."""
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("aarch64-linux-gnu-g++")
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail("aarch64-linux-gnu-g++ missing: .ci/run installs g++-aarch64-linux-gnu")
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    includes = [f"-I{path}" for path in (*include_paths(), sysconfig.get_paths()["include"])]

    def compile_one(source):
        with tempfile.TemporaryDirectory() as out:
            return source.name, subprocess.run(
                [compiler, "-std=c++20", "-O2", "-march=armv8-a", "-fPIC", "-fopenmp", "-DTORCH_EXTENSION_NAME=check",
                 *includes, "-c", str(source), "-o", os.path.join(out, "check.o")],
                capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(2) as pool:
        for name, run in pool.map(compile_one, native.SOURCES):
            assert run.returncode == 0, f"{name}: " + "\n".join(
                line for line in run.stderr.splitlines() if "error" in line)[:3000]


@pytest.mark.parametrize(("rows", "n", "k", "bias"), [(1, 49, 576, False), (3, 64, 35, True), (5, 7, 16, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_matvec_equals_f_linear_and_each_row_its_own(ops, rows, n, k, bias, dtype):
    """gemv (csrc/gemv.cpp) against F.linear to rounding (float32 sums; bf16 rounded once at the end, as oneDNN
    does), for widths that are no multiple of the vector or of the four rows in flight; a row's result is bit for
    bit what it is alone (no batch dependence)."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(rows, k, generator=generator), torch.randn(n, k, generator=generator)
    b = torch.randn(n, generator=generator) if bias else None
    x, weight, b = (None if t is None else t.to(dtype) for t in (x, weight, b))
    got = ops.gemv(x, weight, b)
    expected = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 2 ** -8)
    assert torch.equal(ops.gemv(x[-1:], weight, b)[0], got[-1])


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 49, 576), (3, 70, 35), (5, 7, 640), (16, 33, 130), (2, 4099, 64),
                                             (33, 40, 96)])
def test_native_int8_product_equals_the_exact_integer_product(ops, rows, n, k):
    """int8_gemv (csrc/gemv.cpp) gives exactly x · Wᵀ in int32, the extremes -128 and 127 included, for widths
    and depths that are no multiple of its tiles (16 outputs, 4 inputs) and row counts past its sixteen per pass;
    each row alone gives the same. Given row scales and output scales it gives torch's (x · Wᵀ · row_scales) ·
    scales in float32 bit for bit (what the head computes after torch._int_mm where that is chosen)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (rows, k), generator=generator, dtype=torch.int8)
    weight = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
    x[0, :3], weight[0, :3] = -128, torch.tensor([-128, 127, -128], dtype=torch.int8)
    packed, row_sums = native.pack_int8_tiles(weight), weight.sum(dim=1, dtype=torch.int32)
    got = ops.int8_gemv(x, packed, row_sums)
    exact = x.int() @ weight.int().t()
    assert got.dtype == torch.int32 and torch.equal(got, exact)
    assert all(torch.equal(ops.int8_gemv(x[r:r + 1], packed, row_sums)[0], got[r]) for r in range(rows))
    row_scales, scales = torch.rand(rows, 1, generator=generator) / 7, torch.rand(n, generator=generator) / 3
    scaled = ops.int8_gemv(x, packed, row_sums, row_scales, scales)
    assert scaled.dtype == torch.float32 and torch.equal(scaled, exact * row_scales * scales)
    if quant.exact_int8_matmul() and k % 8 == n % 8 == 0:  # where the head would take torch._int_mm instead
        assert torch.equal(native.int_mm_rows(x, weight, row_sums, row_scales, scales), scaled)


def grouped_reference(x: torch.Tensor, method: str, tensors: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """What int4_gemv and int8_weight_gemv compute: x per group rounded to 8 bits (σ = max|x| / 127; the levels in
    float32 as the kernel finds them, where a bf16 x often falls on a tie), times the dequantised matrix in
    float64."""
    rows, depth = x.shape
    groups = x.float().view(rows, depth // group_size, group_size)
    largest = groups.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, torch.full_like(largest, 127) / largest, 0)  # (not 127 / t: another rounding)
    sigma = (largest / 127).double()
    return (torch.round(groups * inverse).double() * sigma).view(rows, depth) @ (
        quant.dequantize(method, tensors).double().t())


@pytest.mark.parametrize(("method", "rows", "n", "k", "group_size"), [
    ("int4", 1, 16, 64, 32), ("int4", 3, 48, 576, 32), ("int4", 9, 32, 128, 64), ("int4", 16, 80, 256, 32),
    ("int4", 2, 32, 64, 8), ("int4", 25, 16, 64, 32), ("int8", 1, 16, 64, 32), ("int8", 3, 40, 576, 32),
    ("int8", 16, 80, 256, 32), ("int8", 25, 7, 96, 32)])
def test_native_grouped_products_equal_their_8_bit_activation_formula_and_each_row_its_own(ops, method, rows, n, k,
                                                                                          group_size):
    """int4_gemv and int8_weight_gemv (csrc/gemv.cpp) against their formula in float64 to the bf16 rounding of the
    output, and within 2% of the exact product with the dequantised matrix; for row counts past their twelve per
    pass, tile counts no multiple of the ones in flight (and, int8, widths no multiple of a tile), an all-zero group
    and an outlier. A row's result is bit for bit what it is alone, and a NaN reaches its own row's outputs only."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(n, k, generator=generator) * 0.05
    tensors = quant.quantize_int4(weights, group_size) if method == "int4" else quant.quantize_int8(weights)
    x = torch.randn(rows, k, generator=generator)
    x[0, :group_size] = 0
    x[-1, 3] = 40.0
    x = x.bfloat16()
    kernel = f"{method} native"
    product = quant.kernel_product(kernel, group_size)
    operands = quant.PACKS[kernel](tensors)
    got = product(x, *operands)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    expected = grouped_reference(x, method, tensors, group_size)
    torch.testing.assert_close(got.double(), expected, rtol=2 ** -8, atol=1e-5 * float(expected.abs().max()))
    exact = x.double() @ quant.dequantize(method, tensors).double().t()
    assert float((got.double() - exact).norm() / exact.norm()) < 0.02
    assert all(torch.equal(product(x[r:r + 1], *operands)[0], got[r]) for r in range(rows))
    x[-1, 1] = float("nan")  # a NaN (or an infinity) reaches its own row's outputs, and no other row's
    poisoned = product(x, *operands)
    assert poisoned[-1].isnan().all() and torch.equal(poisoned[:-1], got[:-1])


def int4_digest() -> str:
    """A hash of int4_gemv's and int8_weight_gemv's bits on fixed operands: equal wherever the same formula runs
    (VNNI or portable).
    Thirteen rows (two passes), five tiles (one left over), an all-zero group and ties (x · 127 / max|x| exactly
    n + ½)."""
    import hashlib

    generator = torch.Generator().manual_seed(1)
    tensors = quant.quantize_int4(torch.randn(80, 256, generator=generator))
    x = torch.randn(13, 256, generator=generator)
    x[0, :32] = 0
    x[1, :32] = torch.tensor([127.0, 1.5, 2.5, -3.5] * 8)  # σ = 1: every other value a tie
    x = x.bfloat16()
    int8 = quant.quantize_int8(torch.randn(72, 256, generator=generator))
    got = torch.cat([quant.kernel_product("int4 native")(x, *quant.pack_int4_tiles(tensors)),
                     quant.kernel_product("int8 native")(x, *quant.pack_int8_weight(int8))], dim=1)
    return hashlib.sha1(got.view(torch.int16).numpy().tobytes()).hexdigest()[:12]


@torch.inference_mode()
@pytest.mark.parametrize("choice", ["native", "torch"])
def test_quantised_layers_take_the_kernel_chosen_for_this_cpu_in_both_decode_steps(ops, monkeypatch, choice):
    """The kernels chosen for this CPU (timed, `quant.decode_kernel`) pack an int4 model's int4 and int8 layers and
    run in the native and the Python decode step alike; either way the logits follow the dequantised model's
    forward. An int8 model's layers keep torch's kernel, with bf16 inputs, whatever was chosen."""
    monkeypatch.setattr(quant, "_DECODE_KERNELS", {"int4": f"int4 {choice}", "int8": f"int8 {choice}"})
    assert tiny_llama("int8", torch.float32, None, False).blocks[0].attn.o_proj.kernel_name == "int8 torch"
    model = tiny_llama("int4", torch.float32, None, False)
    block = model.blocks[0]
    assert (block.attn.o_proj.kernel_name, block.ffn.down_proj.kernel_name) == (f"int4 {choice}", f"int8 {choice}")
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    for native_step in (True, False):
        step = DecodeStep(model)
        assert (step.native is not None) and {KERNELS[f"int4 {choice}"], KERNELS[f"int8 {choice}"]} <= set(
            step.native[2])
        if not native_step:
            step.native = None
        cache = KVCache(model.config, 1, 8, torch.float32, torch.device("cpu"))
        model(ids[:, :5], cache=cache)
        logits = step(ids[:, 5], torch.tensor([5]), cache, torch.ones(1, 1, 1, 6, dtype=torch.bool))
        assert relative_error(logits[0], full[0, 5]) < 0.05


@torch.inference_mode()
@pytest.mark.parametrize("choice", ["native", "torch"])
def test_a_quantised_head_takes_the_int8_product_chosen_for_this_cpu_and_its_logits_do_not_change(ops, monkeypatch,
                                                                                                  choice):
    from sparkgpt.model import quant

    if not quant.exact_int8_matmul():
        pytest.skip("torch._int_mm is not exact on this CPU: the head takes fbgemm's dynamic linear instead")
    torch.manual_seed(0)
    config = sparkgpt.ModelConfig(vocab_size=512, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=96,
                                  max_seq_len=32, positions="rope", norm="rmsnorm", ffn="swiglu", bias=False)
    model = quant.quantize_model(sparkgpt.GPT(config).eval(), "int4")
    x = torch.randn(3, 64)
    monkeypatch.setitem(native._loaded, "int8 matmul", "torch")
    expected = model.lm_head(x)
    called = []
    monkeypatch.setitem(native._loaded, "int8 matmul", choice)
    kernel = ops.int8_gemv
    monkeypatch.setattr(ops, "int8_gemv", lambda *args: called.append(1) or kernel(*args))
    assert torch.equal(model.lm_head(x), expected) and bool(called) == (choice == "native")


@torch.inference_mode()
@pytest.mark.parametrize("choice", ["native", "torch"])
def test_float32_decode_takes_the_matvec_chosen_for_this_cpu(ops, monkeypatch, choice):
    """The choice (timed per CPU, `native.matvec`) decides the float32 step's projections and head; either way its
    logits equal the whole-sequence forward's."""
    monkeypatch.setitem(native._loaded, "matvec torch.float32", choice)
    torch.manual_seed(0)
    config = sparkgpt.ModelConfig(vocab_size=300, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=96,
                                  max_seq_len=32, positions="rope", norm="rmsnorm", ffn="swiglu", bias=False)
    model = sparkgpt.GPT(config).eval()
    step = DecodeStep(model)
    assert (step.head is model.lm_head) == (choice == "torch")
    assert (step.layers[0].q_proj is model.blocks[0].attn.q_proj) == (choice == "torch")
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = KVCache(config, 2, 9, torch.float32, torch.device("cpu"))
    model(ids[:, :8], cache=cache)
    logits = step(ids[:, 8], torch.full((2,), 8), cache)
    torch.testing.assert_close(logits, model(ids)[:, -1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fused_bf16_pointwise_ops_equal_the_pytorch_formulas(ops):
    """RMSNorm, SiLU(gate) ⊙ up and the rotary turn in one pass each (csrc/pointwise.cpp) against layers.py's and
    attention.py's formulas, run with autograd on (the references). They round at the same steps, so they agree to
    the bit but for a rare last bit of RMSNorm (the order of its sum)."""
    from sparkgpt.model.attention import apply_rotary, rotary_cos_sin
    from sparkgpt.model.layers import RMSNorm

    torch.manual_seed(0)
    dtype = torch.bfloat16
    norm = RMSNorm(200, 1e-5).to(dtype)
    norm.weight.data.normal_()
    x = (torch.randn(3, 7, 200) * torch.logspace(-2, 2, 200)).to(dtype)  # rows of very different sizes
    gate, up = (torch.randn(3, 7, 333) * 4).to(dtype), torch.randn(3, 7, 333).to(dtype)
    q = torch.randn(2, 7, 5, 64).to(dtype).transpose(1, 2)  # [B, H, T, d] as the projections leave it
    cos, sin = (t.to(dtype) for t in rotary_cos_sin(torch.arange(7)[None].expand(2, 7), 64, 10000.0))
    with torch.enable_grad():
        expected = [norm(x), torch.nn.functional.silu(gate) * up, apply_rotary(q, cos, sin),
                    apply_rotary(q, cos[:1], sin[:1])]
    got = [norm(x), ops.silu_mul(gate, up), apply_rotary(q, cos, sin), apply_rotary(q, cos[:1], sin[:1])]
    assert native.inference_ops(x) is ops  # so norm(x) and apply_rotary above ran the native ops
    for ours, reference in zip(got, expected, strict=True):
        assert ours.dtype == dtype and ours.shape == reference.shape
        torch.testing.assert_close(ours, reference.detach(), atol=0, rtol=2 ** -7)
    assert (got[0] != expected[0]).float().mean() < 0.01
    assert all(torch.equal(ours, reference.detach()) for ours, reference in zip(got[1:], expected[1:], strict=True))


def test_fused_ops_stay_out_of_autograd_and_compile():
    x = torch.randn(4, 8, requires_grad=True)
    assert native.inference_ops(x) is None  # grad mode on
    with torch.no_grad():
        assert native.inference_ops(x.bfloat16()) is not None
        assert native.inference_ops(x) is None  # float32 keeps PyTorch's ops, bit for bit
