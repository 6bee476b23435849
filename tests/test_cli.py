"""The `sparkgpt` command: generation from a checkpoint, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from sparkgpt.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparkgpt", *args], capture_output=True, text=True, timeout=120)


def test_generate_prints_the_completion(hf_llama):
    import sparkgpt

    directory = hf_llama[1]
    expected = sparkgpt.load(directory, device="cpu").generate("To be", max_new_tokens=12, temperature=0)
    result = run_cli("generate", str(directory), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    streamed = run_cli("generate", str(directory), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0",
                       "--stream")
    assert streamed.stdout == result.stdout


def test_models_lists_presets_with_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-xl" in out and "1.6B" in out
    assert "smollm2-135m" in out and "134.5M" in out


def test_missing_directory_is_one_line_without_traceback(tmp_path):
    result = run_cli("generate", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert result.returncode == 1
    expected = f"sparkgpt: error: {tmp_path / 'nowhere'}: no such checkpoint directory or .gguf file, and not an alias"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected)


def broken_copy(source, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "config.json").write_text("{not json"), "config.json: not readable JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
    (lambda d: edit_config(d, frobnication_level=3), "config.json: unknown config field(s) frobnication_level"),
    (lambda d: edit_config(d, model_type="mamba"), "config.json: model_type 'mamba' is not supported"),
    (lambda d: edit_config(d, hidden_act="relu"), "config.json: field 'hidden_act' is 'relu'; supported: 'silu'"),
    (lambda d: edit_config(d, num_key_value_heads=4), "config.json: config field 'n_kv_heads' (4) must divide"),
    (lambda d: edit_config(d, hidden_size=128, head_dim=16),
     "model.safetensors: tensor token_embedding.weight has shape"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00\x01garbage"), "model.safetensors: not a valid safetensors"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "never unpickles"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json: not a valid tokenizer.json"),
])
def test_corrupt_checkpoint_gives_a_clear_error(hf_llama, tmp_path, capsys, breakage, message):
    directory = broken_copy(hf_llama[1], tmp_path)
    breakage(directory)
    assert main(["generate", str(directory), "--prompt", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("sparkgpt: error: ") and message in err, err


def test_bad_sampling_option_is_a_clear_error(hf_llama, capsys):
    assert main(["generate", str(hf_llama[1]), "--prompt", "hi", "--top-p", "2", "--device", "cpu"]) == 1
    assert "sampling parameter 'top_p' is 2.0; expected a number in (0, 1]" in capsys.readouterr().err
