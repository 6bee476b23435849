"""Native (C++) kernels, compiled on first use by torch's extension builder and cached per machine.

Five so far, each with a PyTorch version that is its reference in the tests and takes over wherever the native
library is unavailable:

- `decode_layers` (csrc/decode_layers.cpp) runs every block of a quantised Llama-family model's decode step in
  one call (the reference: `DecodeStep`'s loop in decode.py);
- `dequantize_int4` / `dequantize_int8` (csrc/dequantize.cpp) rebuild a quantised weight in bfloat16 in one pass
  for a prompt's matmul (the reference: `quant.dequantize`);
- `local_attention_forward` / `_backward` (csrc/local_attention.cpp): sliding-window attention over each query
  chunk's band of keys alone (the references: the masked dense attention, and the flash-kernel chunks in sparse.py);
- `attention_bf16_forward` / `_backward` (csrc/attention_bf16.cpp): causal or sliding-window attention in bfloat16
  with float32 sums on oneDNN's small-GEMM micro-kernel, where it runs (AMX or AVX512-BF16: `attention_bf16_supported`
  multiplies a known product to find out; the reference: the float32 attention formula);
- `gemv` (csrc/gemv.cpp): a float32 or bf16 model's decode-step matrix–vector products, where timing on this CPU
  finds it faster than torch's (`matvec`; the reference: F.linear); `int8_gemv`, the exact int8 product of a
  quantised head's rows (`int8_matmul`; the reference: torch._int_mm); and `int4_gemv` / `int8_weight_gemv`, an
  int4 model's int4 and int8 layers' products for a decode step's rows (quant.py's `decode_kernel`; the reference:
  the dequantised matrix's product);
- `rms_norm`, `silu_mul`, `rotary` (csrc/pointwise.cpp): a Llama block's per-token steps in one pass each, for
  bf16 inference (`inference_ops`; the references: RMSNorm and SwiGLUFFN in layers.py, apply_rotary in
  attention.py).

The build needs a C++ compiler (g++ or clang) and ninja (a dependency of sparkgpt): about
30 seconds once, then the cached library loads in milliseconds (`TORCH_EXTENSIONS_DIR`, by default
~/.cache/torch_extensions). It is compiled for the CPU it runs on (-march=native; `SPARKGPT_NATIVE_CFLAGS`
replaces those flags), and the library's name carries a hash of that CPU's feature flags, the compiler flags and
the sources, so a home folder shared between machines never loads a build for another CPU or version. AVX-512
loops are used where the CPU has them, portable loops elsewhere (tests/test_native.py also builds and checks the
portable ones).
`SPARKGPT_NATIVE=0` turns the native path off. What loading found is recorded for `sparkgpt info`
(`hardware.note`).

A build killed halfway leaves torch's `lock` file in the build folder, and torch waits for that file to go away,
silently and forever. So every build or load here first takes an exclusive `flock` on `sparkgpt.lock` beside it,
which the kernel releases when its holder dies: a `lock` file found while holding it was left by a killed build
and is removed with a one-line warning. Waiting for another process's build is bounded
(`SPARKGPT_NATIVE_BUILD_WAIT` seconds, default 900), said on stderr after a few seconds, and ends, at the bound, in
the PyTorch versions with a warning naming the holder and the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sparkgpt import hardware

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in (
    "decode_layers.cpp", "dequantize.cpp", "local_attention.cpp", "attention_bf16.cpp", "pointwise.cpp",
    "gemv.cpp")]
HEADERS = [CSRC / "vector_math.h", CSRC / "vnni.h", CSRC / "gemv.h"]


def _build_key(flags: list[str]) -> str:
    """A short hash of this CPU's model and feature flags, the compiler flags and the sources, so a build for
    another CPU, other flags or another version of sparkgpt is never loaded (nor rebuilt over while another
    process uses it)."""
    here = hardware.cpu()
    wanted = [here.model, " ".join(sorted(here.features)), *flags]
    wanted += [path.read_text() for path in (*SOURCES, *HEADERS)]
    return hashlib.sha1("\n".join(wanted).encode()).hexdigest()[:10]


def build_flags() -> list[str]:
    """The compiler flags the library is built with (`SPARKGPT_NATIVE_CFLAGS`, by default for this CPU)."""
    return os.environ.get("SPARKGPT_NATIVE_CFLAGS", "-O3 -march=native").split()


def _library_name(flags: list[str]) -> str:
    return f"sparkgpt_native_{_build_key(flags)}"


def _build_directory(name: str) -> Path | None:
    """The extension builder's folder for `name` (created; a private helper of torch's: None if gone)."""
    from torch.utils import cpp_extension

    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:
        return None


def _built(name: str) -> bool:
    """Whether the extension builder's cache already holds a build of `name`."""
    folder = _build_directory(name)
    return folder is not None and (folder / f"{name}.so").exists()


BUILD_GUARD = "sparkgpt.lock"  # our flock, released by the kernel when its holder dies
TORCH_BATON = "lock"  # torch's own lock file (torch.utils.file_baton), which outlives a killed build


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def build_lock(folder: Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock on the build folder `folder` (see the module's docstring): wait at most `wait_s`
    seconds (default: $SPARKGPT_NATIVE_BUILD_WAIT, else 900) for another process's build, saying so on stderr, then
    raise a one-line error naming the holder and the file; once held, remove torch's `lock` file if a killed build
    left it (a live build would hold this lock)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock alone, as before
        yield
        return
    if wait_s is None:
        wait_s = float(os.environ.get("SPARKGPT_NATIVE_BUILD_WAIT", "900"))
    guard, baton = folder / BUILD_GUARD, folder / TORCH_BATON
    with open(guard, "a+", encoding="utf-8") as handle:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= wait_s:
                    handle.seek(0)
                    holder = handle.read().strip()
                    who = f"pid {holder}" if holder.isdigit() else "another process"
                    if holder.isdigit() and not _alive(int(holder)):
                        advice = f"its holder, pid {holder}, is gone: delete {guard} and {baton}"
                    else:
                        advice = f"end {who} if it is stuck, or delete {guard} if no build is running"
                    raise TimeoutError(f"waited {waited:.0f} s for {who} building the native kernels in {folder} "
                                       f"({advice})") from None
                if not told and waited >= min(3.0, wait_s / 2):
                    print(f"sparkgpt: waiting for another process building the native kernels ({guard}; at most "
                          f"{wait_s:.0f} s, SPARKGPT_NATIVE_BUILD_WAIT)", file=sys.stderr)
                    told = True
                time.sleep(0.1)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        if baton.exists():
            with contextlib.suppress(FileNotFoundError):
                baton.unlink()
            warnings.warn(f"sparkgpt: removed a stale native-build lock {baton} (left by a killed build)",
                          stacklevel=3)
        yield  # closing the file releases the lock


# What loading found: "ops" (the namespace, or None) and "bf16_attention" (bool). Once filled, `ops()` and
# `bf16_attention_supported()` are plain reads of it, which torch.compile traces without a graph break; the
# trainer loads the library before compiling (`load()`), so a compiled step never meets the build.
_loaded: dict[str, Any] = {}


def ops() -> Any | None:
    """The `torch.ops.sparkgpt` namespace, built on first call; None where it cannot be (with one warning saying
    why), or when SPARKGPT_NATIVE=0."""
    if "ops" not in _loaded:
        load()
    return _loaded["ops"]


def bf16_attention_supported() -> bool:
    """Whether attention_bf16 runs here: the library is built and torch's oneDNN has the bf16 micro-kernel for this
    CPU (AMX or AVX-512 bf16)."""
    return ops() is not None and _loaded["bf16_attention"]


@torch.compiler.disable  # it reads files and may build: never traced
def load() -> None:
    """Build or load the library once (see `ops`)."""
    if "ops" in _loaded:
        return
    _loaded.update(ops=None, bf16_attention=False)
    if os.environ.get("SPARKGPT_NATIVE", "1") == "0":
        _loaded["library"] = "off (SPARKGPT_NATIVE=0)"
        _note_library()
        return
    try:
        from torch.utils import cpp_extension

        flags = build_flags()
        name = _library_name(flags)
        folder = _build_directory(name)
        with build_lock(folder) if folder is not None else contextlib.nullcontext():
            if not _built(name):
                print("sparkgpt: compiling native kernels for this CPU (once, about 30 s)", file=sys.stderr)
            cpp_extension.load(name=name, sources=[str(path) for path in SOURCES], is_python_module=False,
                               extra_cflags=[*flags, "-fopenmp"], extra_ldflags=["-fopenmp"],
                               build_directory=None if folder is None else str(folder))
    except Exception as error:  # no compiler or ninja, a failed build: the Python step does the same work
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"sparkgpt: native kernels unavailable ({reason}); using their PyTorch versions",
                      stacklevel=2)
        _loaded["library"] = f"unavailable ({reason})"
        _note_library()
        return
    _register_fakes()
    _loaded.update(ops=torch.ops.sparkgpt, bf16_attention=bool(torch.ops.sparkgpt.attention_bf16_supported()))
    _loaded["library"] = f"{torch.ops.sparkgpt.compiled_loops()} loops ({' '.join(flags)})"
    _note_library()


def note_paths() -> None:
    """Record for `sparkgpt info` every path the library decides (loading it, and timing the decode matrix–vector
    products, first if need be)."""
    load()
    _note_library()
    for dtype in (torch.float32, torch.bfloat16):
        matvec(dtype)


def _note_library() -> None:
    """What loading found: the library, and the bf16 attention it makes possible."""
    built = _loaded["ops"] is not None
    hardware.note("native kernels", _loaded["library"],
                  "compiled on first use for this CPU; SPARKGPT_NATIVE_CFLAGS sets its flags")
    if _loaded["bf16_attention"]:
        engine = "AMX tiles" if hardware.cpu().has("amx_bf16") else "AVX512-BF16"
        hardware.note("bf16 attention", f"native kernel on oneDNN's micro-kernel ({engine})",
                      "the micro-kernel multiplied a test product exactly here")
    else:
        hardware.note("bf16 attention", "torch's SDPA; training upcasts to its float32 flash kernel",
                      "oneDNN runs no bf16 micro-kernel on this CPU (needs AVX512-BF16 or AMX)"
                      if built else "no native library")


DECODE_SWEEP = (24, 1536, 576)  # matrices × rows × columns: more than a CPU's cache holds, as a decode step reads


def matvec(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """`gemv(x, weight, bias)` (csrc/gemv.cpp) for a float32 or bfloat16 model's decode step, where it beats
    torch's own matrix–vector product on this CPU; else None. Which is faster depends on the CPU and its BLAS, so
    both are timed once per dtype on a sweep of weights too large to stay in the cache, as a decode step reads
    them, and the choice is cached (`hardware.fastest`); untimed, the native kernel is the default where it has
    AVX-512 loops."""
    library = ops()
    if library is None or dtype not in (torch.float32, torch.bfloat16):
        return None
    key = f"matvec {dtype}"
    if key not in _loaded:
        count, rows, columns = DECODE_SWEEP
        operands: list[torch.Tensor] = []  # made by the first, untimed call: nothing built if the choice is cached

        def sweep(product: Callable) -> Callable[[], None]:
            def run() -> None:
                if not operands:
                    generator = torch.Generator().manual_seed(0)
                    operands.extend(torch.randn(n, columns, generator=generator).to(dtype)
                                    for n in (1, *[rows] * count))
                x, *weights = operands
                for weight in weights:
                    product(x, weight, None)
            return run

        candidates = {"torch": sweep(torch.nn.functional.linear), "native": sweep(library.gemv)}
        if library.compiled_loops().startswith("AVX-512"):
            candidates = dict(reversed(candidates.items()))
        name = str(dtype).removeprefix("torch.")
        # as a decode step runs: no autograd, and no autocast (a training run may be timing its dtype right now)
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            _loaded[key] = hardware.fastest(f"{name} decode matrix-vector products",
                                            f"{name} matvec " + "x".join(map(str, DECODE_SWEEP)), candidates)
    return library.gemv if _loaded[key] == "native" else None


def pack_int8_tiles(weight: torch.Tensor) -> torch.Tensor:
    """An int8 weight [N, K] in `int8_gemv`'s layout (csrc/gemv.cpp): int8 [⌈N / 16⌉, ⌈K / 4⌉ · 64], tiles of 16
    outputs in blocks of 4 inputs (output n's bytes 4n..4n+3 of block j: W[n, 4j..4j+3]), zero past N and K."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // 16) * 16, -(-k // 4) * 4, dtype=torch.int8, device=weight.device)
    padded[:n, :k] = weight
    tiles, quads = padded.shape[0] // 16, padded.shape[1] // 4
    return padded.view(tiles, 16, quads, 4).transpose(1, 2).reshape(tiles, quads * 64)


def int8_matmul() -> Callable[..., torch.Tensor]:
    """The exact int32 product of a few int8 rows and an int8 weight [N, K], `f(x, weight, row_sums)` (row_sums:
    the weight's rows summed, int32 [N], kept with it), or `f(x, weight, row_sums, row_scales, scales)` for it scaled
    to float32 (one pass, no int32 [rows, N] between): torch._int_mm(x, weightᵀ) (`int_mm_rows`) or `int8_gemv`
    (csrc/gemv.cpp, VNNI where compiled in; the weight packed by `pack_int8_tiles`), whichever was timed faster on
    this CPU for one row and for eight, on a sweep of weights too large for its cache (cached; both give the same
    integers). oneDNN may take AMX tiles even for one row, which streamed a large weight slower than VNNI did
    (RESULTS.md); untimed, ours where it has VNNI, else torch's."""
    library = ops()
    if library is None:
        return int_mm_rows
    if "int8 matmul" not in _loaded:
        count, rows, columns = DECODE_SWEEP
        rows *= 4  # the same bytes as the float32 sweep: a quarter of the bytes per element

        def operands(pack: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Generator], tuple]:
            def make(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
                weight = torch.randint(-127, 128, (rows, columns), generator=generator, dtype=torch.int8)
                return pack(weight), weight.sum(dim=1, dtype=torch.int32)
            return make

        _loaded["int8 matmul"] = fastest_integer_product(
            "int8 decode matrix-vector products (quantised heads)", f"int8 tiles {count}x{rows}x{columns}",
            {"torch": (operands(lambda weight: weight), int_mm_rows),
             "native": (operands(pack_int8_tiles), library.int8_gemv)}, torch.int8, columns)
    return library.int8_gemv if _loaded["int8 matmul"] == "native" else int_mm_rows


def fastest_integer_product(decision: str, work: str,
                            candidates: dict[str, tuple[Callable[[torch.Generator], tuple], Callable[..., Any]]],
                            dtype: torch.dtype, columns: int) -> str:
    """The faster on this CPU (`hardware.fastest`, cached) of a decode step's integer products, each candidate
    (torch's first, ours second) given as (make one weight's operands from a generator, product(x, *operands)):
    timed over DECODE_SWEEP's count of weights, made on first use (an untimed choice builds none), for one row of
    x and for eight. Untimed: ours where its VNNI loops are compiled in, else torch's."""
    count = DECODE_SWEEP[0]
    made: dict[str, list[tuple]] = {}

    def sweep(name: str) -> Callable[[], None]:
        make, product = candidates[name]

        def run() -> None:
            if name not in made:
                generator = torch.Generator().manual_seed(0)
                made[name] = [make(generator) for _ in range(count)]
            for x in (torch.ones(1, columns, dtype=dtype), torch.ones(8, columns, dtype=dtype)):
                for operands in made[name]:
                    product(x, *operands)
        return run

    names = list(candidates)
    library = ops()
    if library is not None and library.integer_loops() != "portable":
        names.reverse()
    with torch.inference_mode():
        return hardware.fastest(decision, f"{work} {' '.join(build_flags())}", {name: sweep(name) for name in names})


def int_mm_rows(x: torch.Tensor, weight: torch.Tensor, row_sums: torch.Tensor, row_scales: torch.Tensor | None = None,
                scales: torch.Tensor | None = None) -> torch.Tensor:
    """torch._int_mm(x, weightᵀ), in `int8_gemv`'s signature (row_sums unused): with row_scales [rows, 1] and scales
    [N], (product · row_scales) · scales in float32, as `int8_gemv` gives it."""
    product = torch._int_mm(x, weight.t())
    return product if scales is None else product * row_scales.reshape(-1, 1) * scales


def inference_ops(x: torch.Tensor) -> Any | None:
    """The library, for the fused per-token ops (csrc/pointwise.cpp), when `x` is a bfloat16 CPU tensor outside
    autograd (no_grad or inference_mode) and outside torch.compile, whose own fusion applies there; else None."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype != torch.bfloat16:
        return None
    return None if torch.compiler.is_compiling() else ops()


def _register_fakes() -> None:
    """Shapes of the ops' outputs without running them, so torch.compile can trace a model that calls them (a
    sparse model's local attention in training)."""

    @torch.library.register_fake("sparkgpt::local_attention_forward")
    def _(q, k, v, window, scale, chunk):
        return torch.empty_like(q), q.new_empty(q.shape[:-1])

    @torch.library.register_fake("sparkgpt::local_attention_backward")
    def _(grad, q, k, v, out, lse, window, scale, chunk):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("sparkgpt::attention_bf16_forward")
    def _(q, k, v, window, scale):
        return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("sparkgpt::attention_bf16_backward")
    def _(grad, q, k, v, out, lse, window, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("sparkgpt::int4_gemv")
    def _(x, weight, group_size, scales):
        return x.new_empty(x.shape[0], weight.shape[0] * 16)

    @torch.library.register_fake("sparkgpt::int8_weight_gemv")
    def _(x, weight, scales):
        return x.new_empty(x.shape[0], scales.shape[0])

    for name in ("rms_norm", "silu_mul", "rotary"):  # outputs shaped and laid out as the first input
        torch.library.register_fake(f"sparkgpt::{name}", lambda x, *rest: torch.empty_like(x))

    @torch.library.register_fake("sparkgpt::dequantize_int4")
    def _(qweight, scales, zeros, group_size):
        return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 2), dtype=torch.bfloat16)

    @torch.library.register_fake("sparkgpt::dequantize_int8")
    def _(qweight, scales):
        return qweight.new_empty(qweight.shape, dtype=torch.bfloat16)
