"""keep_freed_memory: large blocks freed by a CPU training step stay in the process instead of being page-faulted in
again, and the trainer sets it on the CPU unless the config says not to."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparkgpt.errors import SparkGPTError
from sparkgpt.train import train
from sparkgpt.train import trainer as trainer_module

# Allocates, fills and frees a 64 MiB tensor (above glibc's largest mmap threshold) ten times; prints the minor page
# faults of the last eight rounds. A fresh process each, since the setting holds for the rest of a process.
PAGE_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from sparkgpt.train.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    faults = []
    for _ in range(10):
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        block = torch.ones(16 * 2**20)
        del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    print(faults[-1] - faults[2])
""")


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or "LD_PRELOAD" in os.environ or huge_pages_always(),
                    reason="a glibc malloc setting, counted in 4 KiB pages (nothing preloaded, no forced huge pages)")
def test_kept_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096  # one round touches this many 4 KiB pages when the block is fresh from the kernel
    assert page_faults("default") > 6 * pages  # the reference: glibc returns the block and faults it in each round
    # Kept: the block is reused, except when a small allocation has split it meanwhile (one round, rarely two).
    assert page_faults("keep") < 2.5 * pages


@pytest.mark.parametrize("keep, calls", [("true", 1), ("false", 0)])
def test_the_trainer_keeps_host_memory_on_the_cpu_unless_told_not_to(tmp_path, monkeypatch, keep, calls):
    seen = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: seen.append(True))
    (tmp_path / "data").mkdir()  # the trainer decides before it reads the data, so an empty folder suffices
    with pytest.raises(SparkGPTError):
        train("shakespeare-char", tmp_path / "run", {"data": str(tmp_path / "data"), "keep_host_memory": keep,
                                                     "device": "cpu"}, progress=False)
    assert len(seen) == calls
