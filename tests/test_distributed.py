"""Data-parallel training: `torchrun --nproc_per_node=2` on CPU (gloo) against one process with the same global
batch (twice the gradient accumulation): the same losses within 1e-5, and rank 0 alone logs and saves."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_train import build_char_data, metric_rows, tiny

from sparkgpt.cli import main


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    return build_char_data(tmp_path_factory.mktemp("char-data"))


def cli_train_args(run, data, overrides: dict[str, str]) -> list[str]:
    return ["train", "--config", "shakespeare-char", "--out", str(run), "--quiet",
            *[f"--{key}={value}" for key, value in tiny(data, **overrides).items()]]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(char_data, tmp_path):
    overrides = {"max_steps": "12", "save_every": "6", "eval_every": "6", "log_every": "1", "grad_accum": "1"}
    distributed = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sparkgpt",
         *cli_train_args(distributed, char_data, overrides)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    single = tmp_path / "single"
    assert main(cli_train_args(single, char_data, {**overrides, "grad_accum": "2"})) == 0

    ddp_losses = [row["loss"] for row in metric_rows(distributed, "train")]
    single_losses = [row["loss"] for row in metric_rows(single, "train")]
    assert len(ddp_losses) == len(single_losses) == 12  # one row per step: only rank 0 writes
    assert max(abs(a - b) for a, b in zip(ddp_losses, single_losses, strict=True)) < 1e-5, (ddp_losses, single_losses)
    ddp_val = [row["val_loss"] for row in metric_rows(distributed, "eval")]
    single_val = [row["val_loss"] for row in metric_rows(single, "eval")]
    assert max(abs(a - b) for a, b in zip(ddp_val, single_val, strict=True)) < 1e-5
    assert sorted(p.name for p in (distributed / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
