"""The memory planner: within 20% of the peak PyTorch's MemTracker measures during a real training step (one
process here; two, under FSDP and DDP, in test_fsdp.py), parameter counts equal to transformers' for the 7B
preset, a largest micro-batch that is the largest, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import build_char_data

from sparkgpt.cli import main
from sparkgpt.config import preset
from sparkgpt.train import plan
from sparkgpt.train.config import load_train_config
from sparkgpt.train.trainer import Trainer


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    return build_char_data(tmp_path_factory.mktemp("char-data"))


@pytest.mark.parametrize("model, checkpointing", [("shakespeare-char", False), ("shakespeare-char", True),
                                                  ("tiny-gpt2", False)])
def test_estimate_is_within_20_percent_of_the_measured_peak(char_data, tmp_path, model, checkpointing):
    config = load_train_config("shakespeare-char", {
        "data": str(char_data), "model": model, "model.n_layers": "3", "model.d_model": "96", "model.d_ff": "256",
        "model.vocab_size": "96", "block_size": "96", "batch_size": "6", "dtype": "float32", "max_steps": "5",
        "activation_checkpointing": str(checkpointing)})
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.train_step()  # from here on the optimizer state exists, as at every later step
    measured = plan.measure_peak(trainer.model, trainer.optimizer, trainer.train_step)
    estimate = plan.estimate(trainer.model.config, activation_checkpointing=checkpointing, dtype="float32",
                             block_size=96).peak(6)
    assert abs(estimate - measured) <= 0.2 * measured, (estimate, measured)


def test_parameters_of_the_7b_preset_are_llama_2_7b():
    transformers = pytest.importorskip("transformers")
    config = preset("llama-7b")
    reference = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        count = sum(p.numel() for p in transformers.LlamaForCausalLM(reference).parameters())
    memory = plan.estimate(config, world_size=8, parallel="fsdp")
    assert config.num_parameters() == count == 6_738_415_616
    assert memory.parameters == 4 * count // 8 and memory.optimizer == 8 * count // 8


def test_the_largest_micro_batch_is_the_largest_that_fits():
    for name, world, parallel in [("gpt2-xl", 1, "ddp"), ("gpt2-medium", 4, "ddp"), ("llama-7b", 8, "fsdp")]:
        for checkpointing in (False, True):
            memory = plan.estimate(preset(name), world_size=world, parallel=parallel,
                                   activation_checkpointing=checkpointing, block_size=1024)
            device = 80 * plan.GiB
            fits = memory.largest_micro_batch(device)
            assert fits >= 1 and memory.peak(fits) <= device < memory.peak(fits + 1)
    plain = plan.estimate(preset("llama-7b"), world_size=8, parallel="fsdp")
    checkpointed = plan.estimate(preset("llama-7b"), world_size=8, parallel="fsdp", activation_checkpointing=True)
    assert checkpointed.activations < plain.activations / 5
    assert plan.estimate(preset("llama-7b")).largest_micro_batch(80 * plan.GiB) == 0  # 7B does not fit one GPU


def test_plan_command_prints_each_part(capsys):
    assert main(["plan", "--config", "llama-7b", "--world-size", "8", "--device-memory", "80", "--parallel", "fsdp",
                 "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    for part in ("6,738.4M parameters, FSDP over 8 ranks", "parameters (fp32 shard)", "gradients",
                 "optimizer state", "activations per sequence (4096 tokens)", "largest micro-batch in 80 GiB"):
        assert part in out, out
    assert main(["plan", "--config", "shakespeare-char", "--device-memory", "1"]) == 0  # a training preset
    assert "activations per sequence (64 tokens)" in capsys.readouterr().out  # its block_size


@pytest.mark.parametrize("args, message", [
    (["--config", "gpt2", "--device-memory", "0"], "--device-memory is 0.0"),
    (["--config", "gpt2", "--device-memory", "8", "--world-size", "0"], "--world-size is 0"),
    (["--config", "gpt5", "--device-memory", "8"], "not a training preset"),
    (["--config", "gpt2", "--device-memory", "8", "--dtype", "int3"], "--dtype is 'int3'"),
])
def test_bad_plan_input_is_one_line(capsys, args, message):
    assert main(["plan", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
