"""The machine at hand (sparkgpt/hardware.py): reading the CPU, choosing a fast path by timing it once per CPU and
torch, the training dtype that `auto` picks that way, and `sparkgpt info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_train import build_char_data, metric_rows, tiny

import sparkgpt
from sparkgpt import hardware
from sparkgpt.cli import main
from sparkgpt.model import native
from sparkgpt.train import train

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes crc32 asimddp sve bf16 i8mm
CPU implementer\t: 0x41
"""


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Timing on, with its cache in a fresh folder, and no choices recorded yet. The native library is loaded first
    (its build cache stays where it is), and what the library decides here is forgotten afterwards."""
    native.load()
    monkeypatch.setattr(native, "_loaded", dict(native._loaded))
    monkeypatch.setenv("SPARKGPT_MEASURE", "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "_choices", {})
    return tmp_path / "cache"


def fake_cpu(monkeypatch, text: str, machine: str) -> hardware.CPU:
    monkeypatch.setattr(hardware, "_proc_cpuinfo", lambda: hardware.parse_cpuinfo(text))
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    hardware.cpu.cache_clear()
    try:
        return hardware.cpu()
    finally:
        hardware.cpu.cache_clear()


def test_cpuinfo_gives_the_model_and_the_instruction_sets_that_decide_kernels(monkeypatch):
    zen4 = fake_cpu(monkeypatch, ZEN4, "x86_64")
    assert zen4.model == "AMD EPYC 9R14" and zen4.has("avx512_bf16") and zen4.native_bf16
    assert zen4.isa == "AVX2 FMA AVX-512 AVX512-BW AVX512-VNNI AVX512-BF16 (no AMX)"
    graviton = fake_cpu(monkeypatch, GRAVITON3, "aarch64")
    assert graviton.isa == "NEON NEON-DOT SVE BF16 I8MM" and graviton.native_bf16
    assert not fake_cpu(monkeypatch, "flags : sse2 avx2 fma\n", "x86_64").native_bf16
    assert "AMD EPYC 9R14" in zen4.describe() and torch.__version__ in zen4.describe()


def test_the_faster_candidate_is_chosen_cached_and_not_timed_again(measuring):
    calls = []

    def candidate(name, seconds):
        return lambda: calls.append(name) or time.sleep(seconds)

    chosen = hardware.fastest("test decision", "shape-1", {"slow": candidate("slow", 0.03),
                                                           "fast": candidate("fast", 0.0)})
    assert chosen == "fast" and calls.count("slow") == calls.count("fast") == 3  # a warm-up and two rounds each
    entry = json.loads(hardware.choices_file().read_text())["shape-1"]
    assert entry["chosen"] == "fast" and "slow 3" in entry["times"]  # about 30 ms
    assert hardware.choices()[-1].reason.startswith("measured now")

    def never():
        raise AssertionError("a cached choice was timed again")

    assert hardware.fastest("test decision", "shape-1", {"slow": never, "fast": never}) == "fast"
    assert hardware.choices()[-1].reason.startswith("measured on this CPU earlier")
    assert hardware.fastest("test decision", "shape-2", {"slow": candidate("slow", 0.0),
                                                         "fast": candidate("fast", 0.03)}) == "slow"
    assert set(json.loads(hardware.choices_file().read_text())) == {"shape-1", "shape-2"}  # both kept


def test_a_damaged_cache_is_timed_again_and_rewritten_whole(measuring):
    hardware.choices_file().parent.mkdir(parents=True)
    hardware.choices_file().write_text("{not json")
    assert hardware.fastest("d", "k", {"a": lambda: time.sleep(0.02), "b": lambda: None}) == "b"
    assert json.loads(hardware.choices_file().read_text())["k"]["chosen"] == "b"


def test_without_measuring_the_first_candidate_is_the_default(measuring, monkeypatch):
    monkeypatch.setenv("SPARKGPT_MEASURE", "0")
    assert hardware.fastest("d", "k", {"first": lambda: time.sleep(0.05), "second": lambda: None}) == "first"
    assert not hardware.choices_file().exists()


def test_another_cpu_or_torch_version_has_its_own_cache(measuring, monkeypatch):
    here = hardware.choices_file()
    monkeypatch.setattr(hardware.torch, "__version__", "9.9.9")
    assert hardware.choices_file() != here
    monkeypatch.undo()
    fake_cpu(monkeypatch, ZEN4, "x86_64")
    monkeypatch.setattr(hardware, "cpu", lambda: hardware.CPU("Another CPU", "x86_64", frozenset({"avx2"}), "AVX2",
                                                              2, 2))
    assert hardware.choices_file() != here


def test_auto_dtype_is_timed_on_the_cpu_then_read_back_and_leaves_the_run_unchanged(measuring, tmp_path,
                                                                                     monkeypatch):
    """dtype auto times bf16 autocast against float32 on the run's first micro-batch, saves the winner in the
    run's config (a resume keeps it), and disturbs nothing: the same run with that dtype written out trains to the
    same losses. A second run of the same shape reads the choice from the cache."""
    data = build_char_data(tmp_path)
    settings = {**tiny(data, max_steps=4, eval_every=4), "dtype": "auto"}
    train("shakespeare-char", tmp_path / "auto", settings, progress=False)
    chosen = next(c for c in hardware.choices() if c.decision.startswith("training dtype"))
    assert chosen.reason.startswith("measured now")
    times = dict(part.rsplit(" ", 2)[:2] for part in chosen.reason.removeprefix("measured now: ").split(", "))
    assert set(times) == {"bfloat16", "float32"} and chosen.chosen == min(times, key=lambda name: float(times[name]))
    saved = (tmp_path / "auto" / "config.yaml").read_text()
    assert f"dtype: {chosen.chosen}" in saved
    train("shakespeare-char", tmp_path / "fixed", {**settings, "dtype": chosen.chosen}, progress=False)
    assert [r["loss"] for r in metric_rows(tmp_path / "auto", "train")] == \
        [r["loss"] for r in metric_rows(tmp_path / "fixed", "train")]
    train("shakespeare-char", tmp_path / "again", settings, progress=False)
    again = next(c for c in hardware.choices() if c.decision.startswith("training dtype"))
    assert again.chosen == chosen.chosen and again.reason.startswith("measured on this CPU earlier")
    # A resumed run keeps the dtype its config.yaml saved, even where the cache has gone and timing would differ.
    other = "float32" if chosen.chosen == "bfloat16" else "bfloat16"
    hardware.choices_file().unlink()
    monkeypatch.setattr(hardware, "fastest", lambda *args, **kwargs: other)
    resumed = train("shakespeare-char", tmp_path / "auto", {**settings, "max_steps": 6}, resume=True, progress=False)
    assert resumed.step == 6 and f"dtype: {chosen.chosen}" in (tmp_path / "auto" / "config.yaml").read_text()


def test_info_names_the_cpu_its_isa_and_each_chosen_path_with_why(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    here = hardware.cpu()
    assert here.model in out and here.isa in out
    for path in ("native kernels:", "bf16 attention:", "quantised decode", "quantised prefill", "threads:"):
        assert path in out
    assert out.count("why:") >= 5
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu"]["isa"] == here.isa and {c["path"] for c in report["chosen"]} >= {"native kernels", "threads"}


def test_without_a_cxx_compiler_a_compiled_preset_trains_uncompiled_and_says_so(monkeypatch, tmp_path, measuring):
    """torch.compile on the CPU needs a C++ compiler (Inductor writes C++): where there is none, the run warns and
    trains the plain blocks instead of failing at its first step."""
    monkeypatch.setattr(hardware, "cxx_compiler", lambda: None)
    data = build_char_data(tmp_path)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        result = train("shakespeare-char", tmp_path / "run", {**tiny(data, max_steps=2), "compile": "true"},
                       progress=False)
    assert result.step == 2
    assert any(c.decision == "torch.compile" and c.chosen == "off" for c in hardware.choices())


def test_the_cxx_compiler_is_the_one_inductor_would_use(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert hardware.cxx_compiler() is None
    monkeypatch.delenv("CXX")
    expected = "clang++" if hardware.sys.platform == "darwin" else "g++"
    assert hardware.cxx_compiler() == hardware.shutil.which(expected)


OPENMP_POOLS = """
import importlib.util, os, sys, threading, time
import torch
# packages that load their own copy of libgomp: the release must still find torch's
for name in ("ctranslate2", "sklearn", "faiss"):
    if importlib.util.find_spec(name) is not None:
        __import__(name)
from sparkgpt import hardware

torch.set_num_threads(2)
def threads(expected=None):
    # a thread joined may stay listed for a moment after: wait for the count expected, a second at most
    deadline = time.monotonic() + 1
    while expected is not None and len(os.listdir("/proc/self/task")) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(os.listdir("/proc/self/task"))
def parallel_work():
    x = torch.randn(1024, 1024)
    x @ x

base = threads()
parallel_work()  # the main thread's pool: one worker beside it
if threads() != base + 1:
    sys.exit(3)  # another runtime or pool policy: nothing to test here
other_done, release_other, seen = threading.Event(), threading.Event(), []
def other():
    parallel_work()
    other_done.set()
    release_other.wait()
    seen.append(hardware.release_idle_threads())
    seen.append(threads(base + 1))  # its own worker gone, the thread itself still running
worker = threading.Thread(target=other)
worker.start()
other_done.wait()
assert threads() == base + 3, threads()  # the other thread and its worker
assert hardware.release_idle_threads()
assert threads(base + 2) == base + 2, threads()  # main's worker gone, the other thread's kept
release_other.set()
worker.join()
assert seen == [True, base + 1], seen
parallel_work()  # a released pool comes back when needed
assert threads() == base + 1
print("ok")
"""


def test_releasing_idle_openmp_workers_frees_the_calling_threads_pool_and_no_other(tmp_path):
    """GNU OpenMP sleeps every worker between parallel regions once all threads' pools together outnumber the CPUs,
    so a thread that generates must not share the machine with another's idle pool (RESULTS.md, "Serving")."""
    if hardware._gnu_openmp() is None:
        assert not hardware.release_idle_threads()  # other runtimes: nothing is released, nothing fails
        pytest.skip("torch does not run on GNU OpenMP here")
    script = tmp_path / "pools.py"
    script.write_text(OPENMP_POOLS)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    if result.returncode == 3:
        pytest.skip("torch's OpenMP did not keep one worker per pool here")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_loading_generating_and_an_idle_engine_let_their_threads_openmp_workers_go(monkeypatch, tokenizer, tmp_path):
    from sparkgpt import SamplingParams
    from sparkgpt.generate import token_steps
    from sparkgpt.serve.engine import Engine
    from tests.test_serve import tiny_lm

    callers = []
    monkeypatch.setattr(hardware, "release_idle_threads", lambda: callers.append(threading.current_thread().name))
    saved = tiny_lm(tokenizer)
    saved.save(tmp_path / "model")
    lm = sparkgpt.load(tmp_path / "model")
    assert callers == ["MainThread"]
    params = SamplingParams(max_new_tokens=3, temperature=0)
    steps = []
    generating = threading.Thread(target=lambda: steps.extend(token_steps(lm.model, [[1, 2, 3]], params)),
                                  name="worker")
    generating.start()
    generating.join()
    assert len(steps) == 3 and callers == ["MainThread", "worker"]

    def engine_releases(count: int) -> bool:
        deadline = time.monotonic() + 10
        while callers.count("sparkgpt-engine") < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return callers.count("sparkgpt-engine") >= count

    callers.clear()
    engine = Engine(lm, max_slots=1).start()
    try:
        assert "MainThread" in callers  # the caller hands the computing to the engine thread
        assert engine_releases(1)       # idle before the first request
        before = callers.count("sparkgpt-engine")
        assert len(engine.generate([1, 2, 3], params)[0].token_ids) == 3
        assert engine_releases(before + 1)  # idle again after it
    finally:
        engine.stop()
