"""The machine at hand: its CPU and instruction sets, and the fast paths chosen for it.

A fast path is chosen in one of two ways, and both are recorded here so that `sparkgpt info` can say what was
chosen and why:

- by capability (`note`): a kernel that needs an instruction set the CPU lacks is never taken;
- by measurement (`fastest`): where the candidates all run here but their order differs from CPU to CPU (bf16
  against float32 training on a CPU with or without AMX), each is timed once on this machine, in interleaved
  rounds, and the winner is cached in a JSON file beside the native build cache (`TORCH_EXTENSIONS_DIR`, by
  default ~/.cache/torch_extensions), keyed by the CPU's model and feature flags and torch's version. A later run
  on the same machine reads the choice instead of timing again; another CPU or torch gets its own file.
  `SPARKGPT_MEASURE=0` skips the timing and takes each decision's first candidate (its documented default).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparkgpt.files import atomic_file

# Feature flags that decide a kernel, as /proc/cpuinfo names them, and how `CPU.isa` prints them.
ISA_NAMES = {
    "avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512bw": "AVX512-BW", "avx512_vnni": "AVX512-VNNI",
    "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16", "amx_tile": "AMX", "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8", "asimd": "NEON", "asimddp": "NEON-DOT", "sve": "SVE", "sve2": "SVE2", "bf16": "BF16",
    "i8mm": "I8MM",
}


@dataclass(frozen=True)
class CPU:
    """What sparkgpt reads of the processor once per process."""

    model: str                 # "AMD EPYC 9R14", "Intel(R) Xeon(R) Platinum 8488C", "Apple M2", ...
    architecture: str          # platform.machine(): x86_64, aarch64, arm64
    features: frozenset[str]   # the kernel's feature flags (Linux: /proc/cpuinfo), lower case
    torch_kernels: str         # the vector width torch's own CPU kernels were dispatched to (AVX512, AVX2, ...)
    cores: int                 # logical CPUs this process may run on
    threads: int               # torch's intra-op threads

    def has(self, *features: str) -> bool:
        return all(feature in self.features for feature in features)

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU multiplies bfloat16 in hardware (AMX, AVX512-BF16, ARM's BF16) rather than emulating it."""
        return bool(self.features & {"amx_bf16", "avx512_bf16", "bf16"})

    @property
    def isa(self) -> str:
        """The instruction sets that matter to sparkgpt's kernels, e.g. "AVX2 FMA AVX-512 AVX512-BF16 (no AMX)"."""
        names = [name for flag, name in ISA_NAMES.items() if flag in self.features]
        if self.architecture in ("x86_64", "AMD64") and "amx_tile" not in self.features:
            names.append("(no AMX)")
        return " ".join(names) or "unknown (no feature flags readable)"

    def describe(self) -> str:
        """One line for benchmark output and RESULTS.md: model, architecture, ISA, torch and its threads."""
        return (f"{self.model} ({self.architecture}; {self.isa}); torch {torch.__version__} with {self.torch_kernels} "
                f"kernels, {self.threads} threads on {self.cores} cores")


def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return "", frozenset()


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first processor in Linux's /proc/cpuinfo text (x86 or ARM)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("cpu model") or fields.get("hardware") or ""
    flags = fields.get("flags") or fields.get("features") or ""  # x86 names them flags, ARM features
    return model, frozenset(flags.lower().split())


@functools.cache
def cpu() -> CPU:
    model, features = _proc_cpuinfo()
    if not model and sys.platform == "darwin":  # Apple Silicon: no /proc; NEON and BF16 are standard there
        model = platform.processor() or "Apple"
        features = frozenset({"asimd", "asimddp", "bf16", "i8mm"}) if platform.machine() == "arm64" else features
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return CPU(model=model or platform.processor() or "unknown CPU", architecture=platform.machine(),
               features=features, torch_kernels=torch.backends.cpu.get_cpu_capability(), cores=cores,
               threads=torch.get_num_threads())


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's Inductor would use for the CPU ($CXX, else g++ on Linux and clang++ on
    macOS, as Inductor looks for them), or None where it is missing."""
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return shutil.which(name)


def machine_key() -> str:
    """A short hash of everything a measured choice depends on beyond its own inputs: the CPU's model and features,
    torch's version and its thread count."""
    here = cpu()
    text = "\n".join([here.model, here.architecture, " ".join(sorted(here.features)), torch.__version__,
                      str(torch.get_num_threads())])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---- the choices made in this process ------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    decision: str     # what was decided, e.g. "training dtype (shakespeare-char, batch 12 × 64)"
    chosen: str       # the path taken
    reason: str       # why, in a phrase: the capability, or the measured times


_choices: dict[str, Choice] = {}


def note(decision: str, chosen: str, reason: str) -> str:
    """Record a choice made by capability (or by a user's setting), for `sparkgpt info`; returns `chosen`."""
    _choices[decision] = Choice(decision, chosen, reason)
    return chosen


def choices() -> list[Choice]:
    """Every choice recorded in this process so far, in the order they were first made."""
    return list(_choices.values())


def choices_file() -> Path:
    """Where measured choices are cached: beside torch's extension builds (the native kernels' cache)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"sparkgpt-choices-{machine_key()}.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # missing, or damaged by hand: measure again and write it whole
    return value if isinstance(value, dict) else {}


def measure(candidates: dict[str, Callable[[], Any]], rounds: int = 2) -> dict[str, float]:
    """Seconds per call of each candidate, the best of `rounds` after one warm-up call each; the candidates take
    turns, so that a drift in this machine's speed falls on all of them alike."""
    for run in candidates.values():
        run()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def fastest(decision: str, key: str, candidates: dict[str, Callable[[], Any]], rounds: int = 2) -> str:
    """The name of the fastest of `candidates` on this machine for the work `key` describes (its shapes): read from
    the cache where this CPU and torch measured it before, else timed now (`measure`) and cached. The first
    candidate is the default taken when timing is off (`SPARKGPT_MEASURE=0`)."""
    if not candidates:
        raise ValueError("fastest() needs at least one candidate")
    default = next(iter(candidates))
    if len(candidates) == 1:
        return note(decision, default, "the only candidate here")
    if os.environ.get("SPARKGPT_MEASURE", "1") == "0":
        return note(decision, default, "the default (SPARKGPT_MEASURE=0: not timed)")
    path = choices_file()
    cached = _read_cache(path).get(key)
    if isinstance(cached, dict) and cached.get("chosen") in candidates:
        return note(decision, cached["chosen"], f"measured on this CPU earlier ({cached.get('times', '?')}; "
                                                f"cached in {path})")
    print(f"sparkgpt: timing {' against '.join(candidates)} for {decision} on this CPU (once; cached)",
          file=sys.stderr)
    times = measure(candidates, rounds)
    chosen = min(times, key=times.__getitem__)
    summary = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in times.items())
    try:  # read again: another process may have cached other keys meanwhile
        entries = {**_read_cache(path), key: {"chosen": chosen, "times": summary, "decision": decision,
                                              "cpu": cpu().model, "torch": torch.__version__}}
        with atomic_file(path) as file:
            file.write(json.dumps(entries, indent=2, sort_keys=True).encode())
    except OSError:
        pass  # a read-only home: the choice holds for this process and is measured again next time
    return note(decision, chosen, f"measured now: {summary}")


def cached_choices() -> dict[str, dict[str, Any]]:
    """The measured choices cached for this CPU and torch (key -> {"chosen", "times", ...})."""
    return {key: value for key, value in _read_cache(choices_file()).items() if isinstance(value, dict)}


def cuda_bf16(device: torch.device | int | None = None) -> bool:
    """Whether a CUDA device multiplies bf16 in hardware (compute capability 8.0 and later: Ampere, Hopper, ...);
    torch's `is_bf16_supported()` also says yes where it is emulated, slowly (T4, V100)."""
    return torch.cuda.is_available() and torch.cuda.get_device_properties(device).major >= 8


def gpus() -> list[str]:
    """The CUDA devices torch sees, as "name (N GiB, compute capability X.Y, bf16)", or []."""
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        found.append(f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{properties.major}.{properties.minor}{', bf16' if cuda_bf16(index) else ''})")
    return found


# ---- OpenMP worker threads -----------------------------------------------------------------------------------

class _SymbolInfo(ctypes.Structure):
    """dladdr's Dl_info: which loaded file holds an address."""
    _fields_ = [("file", ctypes.c_char_p), ("base", ctypes.c_void_p), ("symbol", ctypes.c_char_p),
                ("address", ctypes.c_void_p)]


@functools.cache
def _gnu_openmp() -> Any:
    """`omp_pause_resource_all` of the OpenMP runtime torch itself runs on, where that is GNU's; else None.

    Found through torch's own extension (a lookup through its handle searches the libraries it depends on), since
    other packages load their own copies of libgomp (scikit-learn, faiss, ctranslate2), and pausing one of those
    would leave torch's workers in place. Only GNU's pause releases the calling thread's pool alone; LLVM's and
    Intel's (macOS, some builds, or a libomp installed under libgomp's name: they export `__kmpc_fork_call`) stop
    every thread's, in the middle of another thread's work, so they are left alone."""
    try:
        pause = ctypes.CDLL(torch._C.__file__).omp_pause_resource_all
        info = _SymbolInfo()
        if not ctypes.CDLL(None).dladdr(ctypes.cast(pause, ctypes.c_void_p), ctypes.byref(info)) or not info.file:
            return None
        path = info.file.decode()
        if not os.path.basename(path).startswith("libgomp") or hasattr(ctypes.CDLL(path), "__kmpc_fork_call"):
            return None
    except (OSError, AttributeError, TypeError):  # no such runtime, no dladdr (Windows), a libgomp before GCC 9
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


def release_idle_threads() -> bool:
    """Let the calling thread's OpenMP workers go, at the end of its parallel work (a model loaded, a reply
    generated, a serving engine gone idle). Returns whether GNU OpenMP released them.

    Why: GNU OpenMP keeps each thread's pool of workers after its parallel regions, and once the pools of all
    threads together hold more threads than the machine has CPUs, every worker sleeps at the end of each region
    instead of spinning. A decode step runs a hundred small regions, each then waiting for its workers to wake:
    a model run from a second thread (a serving engine, a web framework's worker) while the thread that loaded it
    kept its pool decoded at a third of its speed (benchmarks/RESULTS.md, "Serving"). The next parallel work of
    this thread starts a worker again (microseconds). Does nothing inside a parallel region or on other runtimes."""
    pause = _gnu_openmp()
    if pause is None or torch.get_num_threads() < 2:
        return False
    return pause(1) == 0  # omp_pause_soft: the calling thread's pool only (GNU)
