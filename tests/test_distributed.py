"""Data-parallel training: `torchrun --nproc_per_node=2` on CPU (gloo) against one process with the same global
batch (twice the gradient accumulation): the same losses within 1e-5, rank 0 alone logs and saves, and `dtype: auto`
is timed by rank 0 and taken by every rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import build_char_data, metric_rows, tiny

from sparkgpt.cli import main


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    return build_char_data(tmp_path_factory.mktemp("char-data"))


def cli_train_args(run, data, overrides: dict[str, str]) -> list[str]:
    return ["train", "--config", "shakespeare-char", "--out", str(run), "--quiet",
            *[f"--{key}={value}" for key, value in tiny(data, **overrides).items()]]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch_in_the_dtype_rank_0_timed(char_data, tmp_path):
    overrides = {"max_steps": "12", "save_every": "6", "eval_every": "6", "log_every": "1", "grad_accum": "1",
                 "dtype": "auto"}
    distributed = tmp_path / "ddp"
    # Timing on, its cache in a fresh folder (the native build copied there, so nothing compiles again).
    cache = tmp_path / "cache"
    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    if built.is_dir():
        shutil.copytree(built, cache, ignore=shutil.ignore_patterns("sparkgpt-choices-*", "*.lock", "lock"))
    else:
        cache.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARKGPT_MEASURE": "1", "TORCH_EXTENSIONS_DIR": str(cache)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sparkgpt",
         *cli_train_args(distributed, char_data, overrides)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (choices,) = cache.glob("sparkgpt-choices-*.json")
    (timed,) = [entry for entry in json.loads(choices.read_text()).values() if entry["decision"].startswith(
        "training dtype")]
    assert "bfloat16" in timed["times"] and "float32" in timed["times"]
    assert f"dtype: {timed['chosen']}" in (distributed / "config.yaml").read_text()

    # Equal losses to one process in that dtype, on one thread as each rank ran: every rank computed in rank 0's
    # choice (bf16 and float32 part by far more than the tolerance; bf16 gets a little more, as a weight that the
    # all-reduce rounds differently in its last float32 bit can round to another bf16 value).
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(cli_train_args(single, char_data, {**overrides, "grad_accum": "2", "dtype": timed["chosen"]})) == 0
    finally:
        torch.set_num_threads(threads)
    tolerance = 1e-5 if timed["chosen"] == "float32" else 1e-4

    ddp_losses = [row["loss"] for row in metric_rows(distributed, "train")]
    single_losses = [row["loss"] for row in metric_rows(single, "train")]
    assert len(ddp_losses) == len(single_losses) == 12  # one row per step: only rank 0 writes
    assert max(abs(a - b) for a, b in zip(ddp_losses, single_losses, strict=True)) < tolerance, (ddp_losses,
                                                                                                single_losses)
    ddp_val = [row["val_loss"] for row in metric_rows(distributed, "eval")]
    single_val = [row["val_loss"] for row in metric_rows(single, "eval")]
    assert max(abs(a - b) for a, b in zip(ddp_val, single_val, strict=True)) < tolerance
    assert sorted(p.name for p in (distributed / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
