"""Safety outside the server: a killed native build never hangs later starts, the dependency floors are past the
known CVEs, one training run per folder with atomic config and metrics snapshots, and alias packages cannot write
outside their folder (zip-slip) nor point outside their installed package."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from sparkgpt import files
from sparkgpt.checkpoint import registry
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import native

ROOT = Path(__file__).resolve().parent.parent

# ---- a stale native-build lock ----------------------------------------------------------------------------------


def test_a_stale_native_build_lock_is_removed_with_one_warning(tmp_path):
    """torch's `lock` file left by a killed build (planted here) made every later start wait forever, silently; now
    the next start removes it, says so in one warning, and goes on (here to a failed build, as CXX names no
    compiler: the PyTorch versions take over)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "no-such-compiler"}
    env.pop("SPARKGPT_NATIVE", None)
    folder = tmp_path / native._library_name(native.build_flags())  # the same flags: the environment is the same
    folder.mkdir()
    (folder / native.TORCH_BATON).touch()
    script = textwrap.dedent("""
        import warnings
        from sparkgpt.model import native
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            missing = native.ops() is None
        stale = [str(w.message) for w in caught if "stale native-build lock" in str(w.message)]
        print(missing, len(stale))
        print(stale[0] if stale else "")
    """)
    try:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the start hung on the stale build lock")
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and lines[0] == "True 1", run.stdout + run.stderr[-2000:]
    assert str(folder / native.TORCH_BATON) in lines[1] and "\n" not in lines[1]
    assert not (folder / native.TORCH_BATON).exists()


def test_a_live_native_build_is_waited_for_with_a_bound_and_a_message(tmp_path, capsys):
    """While another process builds (it holds the flock), its torch lock is left alone; the wait is said on stderr
    and ends at the bound in a one-line error naming the files."""
    (tmp_path / native.TORCH_BATON).touch()
    with open(tmp_path / native.BUILD_GUARD, "a+") as other:  # another open file: flock conflicts even in-process
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("999999999\n")
        other.flush()
        with pytest.raises(TimeoutError) as raised, native.build_lock(tmp_path, wait_s=0.6):
            pass
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / native.BUILD_GUARD) in message and "waited" in message
    assert "pid 999999999" in message
    assert "waiting for another process building the native kernels" in capsys.readouterr().err
    assert (tmp_path / native.TORCH_BATON).exists()  # a live build's lock is never taken away
    with pytest.warns(UserWarning, match="stale native-build lock"), native.build_lock(tmp_path, wait_s=0.6):
        assert not (tmp_path / native.TORCH_BATON).exists()  # the holder is gone: now it is stale
        assert (tmp_path / native.BUILD_GUARD).read_text().strip() == str(os.getpid())


def test_a_native_load_times_out_into_the_pytorch_versions(tmp_path):
    """A build that never ends elsewhere costs this process SPARKGPT_NATIVE_BUILD_WAIT seconds, then a warning."""
    folder = tmp_path / native._library_name(native.build_flags())
    folder.mkdir()
    script = "from sparkgpt.model import native; print(native.ops() is None)"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "SPARKGPT_NATIVE_BUILD_WAIT": "1"}
    env.pop("SPARKGPT_NATIVE", None)
    with open(folder / native.BUILD_GUARD, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stdout + run.stderr[-2000:]
    assert "native kernels unavailable (waited" in run.stderr and str(folder / native.BUILD_GUARD) in run.stderr


# ---- dependency floors -----------------------------------------------------------------------------------------

FLOORS = {
    "torch": "2.6.0",       # CVE-2025-32434: torch.load(weights_only=True) runs code
    "jinja2": "3.1.6",      # CVE-2025-27516 (and CVE-2024-56201, -56326): sandbox escapes
    "tqdm": "4.66.3",       # CVE-2024-34062: CLI arguments evaluated
    "pypdf": "6.0.0",       # CVE-2025-55197: RAM exhaustion from a crafted FlateDecode stream
    "starlette": "0.49.1",  # CVE-2025-62727: quadratic Range header in FileResponse (the chat page)
    "h11": "0.16.0",        # CVE-2025-43859: request smuggling through uvicorn's HTTP/1.1 parser
}


def test_dependency_floors_are_past_the_known_cves():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = text[text.index("dependencies = ["):]
    block = block[:block.index("\n]")]
    requirements = {}
    for line in block.splitlines()[1:]:
        line = line.split("#", 1)[0].strip().rstrip(",")
        if line:
            requirement = Requirement(line.strip('"'))
            requirements[requirement.name.lower()] = requirement
    for name, fixed in FLOORS.items():
        floors = [Version(spec.version) for spec in requirements[name].specifier if spec.operator == ">="]
        assert floors and min(floors) >= Version(fixed), f"{name}: {requirements[name]} admits versions before {fixed}"


# ---- one training run per folder, atomic snapshots --------------------------------------------------------------

TINY = {"model.n_layers": "1", "model.n_heads": "2", "model.d_model": "32", "model.d_ff": "64",
        "block_size": "16", "batch_size": "4", "dtype": "float32", "warmup_steps": "1", "eval_batches": "2",
        "compile": "false", "log_every": "1", "eval_every": "2", "save_every": "2"}


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    from sparkgpt.data import prepare

    root = tmp_path_factory.mktemp("safety-data")
    (root / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 200, encoding="utf-8")
    prepare([root / "corpus.txt"], root / "data", tokenizer="char", workers=1, progress=False)
    return root / "data"


def test_a_second_run_into_a_held_folder_fails_in_one_line(char_data, tmp_path):
    from sparkgpt.train import run as run_module
    from sparkgpt.train import train

    out = tmp_path / "run"
    overrides = {**TINY, "data": str(char_data), "max_steps": "2"}
    with files.exclusive_lock(out / run_module.RUN_LOCK, "held by this test"), \
            pytest.raises(SparkGPTError) as raised:
        train("shakespeare-char", out, overrides, progress=False)
    message = str(raised.value)
    assert message.startswith(f"{out}: another training run is writing to this folder") and "\n" not in message
    assert f"(pid {os.getpid()})" in message
    assert not (out / "config.yaml").exists()  # the refused run wrote nothing
    result = train("shakespeare-char", out, overrides, progress=False)  # released: the folder is free again
    assert result.step == 2
    with files.exclusive_lock(out / run_module.RUN_LOCK, "held by this test"), \
            pytest.raises(SparkGPTError, match="another training run is writing to this folder"):  # it let go
        train(None, out, {"max_steps": "4"}, resume=True, progress=False)  # resuming (and fine-tuning) alike
    assert train(None, out, {"max_steps": "4"}, resume=True, progress=False).step == 4


def test_config_and_metrics_snapshots_are_written_atomically(char_data, tmp_path, monkeypatch):
    from sparkgpt.train import train
    from sparkgpt.train import trainer as trainer_module

    written = []
    real = files.atomic_file

    @contextlib.contextmanager
    def recording(path):
        with real(path) as handle:
            yield handle
        written.append(Path(path))

    monkeypatch.setattr(files, "atomic_file", recording)
    monkeypatch.setattr(trainer_module, "atomic_file", recording)
    out = tmp_path / "run"
    train("shakespeare-char", out, {**TINY, "data": str(char_data), "max_steps": "2"}, progress=False)
    assert {out / "config.yaml", out / "metrics.jsonl", out / "loss.png"} <= set(written)
    written.clear()
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"kind": "train", "step": 3, "lo')  # a row cut short by a kill
    train(None, out, {"max_steps": "4"}, resume=True, progress=False)
    assert written.count(out / "metrics.jsonl") == 1 and out / "config.yaml" in written  # truncation, config
    assert all(line.endswith("}") for line in (out / "metrics.jsonl").read_text().splitlines())
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # no staging file left behind


# ---- alias packages: zip-slip and paths outside the package ------------------------------------------------------


def _fake_pip(members: dict[str, bytes], symlinks: tuple[str, ...] = ()):
    def run(command, **kwargs):
        dest = command[command.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/no_such_installed_package-1.0-py3-none-any.whl", "w") as wheel:
            for name, data in members.items():
                wheel.writestr(name, data)
            for name in symlinks:
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                wheel.writestr(info, "/etc/passwd")
        return subprocess.CompletedProcess(command, 0)
    return run


@pytest.mark.parametrize("alias_file, members, symlinks, message", [
    ("pkg/model/", {"pkg/model/config.json": b"{}", "pkg/model/../../../../escaped.txt": b"x"}, (),
     "would be written outside the package folder"),
    ("pkg/model/", {"pkg/model/config.json": b"{}", "pkg/model//tmp/escaped.txt": b"x"}, (),
     "would be written outside the package folder"),
    ("pkg/model/", {"pkg/model/config.json": b"{}"}, ("pkg/model/tokenizer.json",), "is a symbolic link"),
    ("model.gguf", {"/abs/model.gguf": b"x"}, (), "would be written outside the package folder"),
    ("model.gguf", {"../model.gguf": b"x"}, (), "would be written outside the package folder"),
    ("model.gguf", {}, ("pkg/model.gguf",), "is a symbolic link"),
])
def test_alias_archives_cannot_write_outside_their_folder(monkeypatch, tmp_path, alias_file, members, symlinks,
                                                          message):
    alias = registry.Alias("hostile package", package="no-such-installed-package", filename=alias_file)
    monkeypatch.setitem(registry.ALIASES, "hostile", alias)
    monkeypatch.setenv("SPARKGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry.subprocess, "run", _fake_pip(members, symlinks))
    with pytest.raises(SparkGPTError, match=message) as raised:
        registry.resolve("hostile")
    assert "\n" not in str(raised.value) and "no_such_installed_package-1.0-py3-none-any.whl" in str(raised.value)
    package = tmp_path / "cache" / "packages" / "no-such-installed-package"
    assert list(package.iterdir()) == []  # nothing extracted, no partial download left
    assert not [p for p in tmp_path.rglob("escaped.txt")] and not Path("/tmp/escaped.txt").exists()


class _FakeFile:
    def __init__(self, root: Path, name: str) -> None:
        self.root, self.path = root, name
        self.name = name.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.path

    def locate(self) -> Path:
        return self.root / self.path


class _FakeDistribution:
    def __init__(self, root: Path, names: list[str]) -> None:
        self.root, self.files = root, [_FakeFile(root, name) for name in names]

    def locate_file(self, path: str) -> Path:
        return self.root / path


def test_installed_alias_files_must_lie_inside_the_installed_package(monkeypatch, tmp_path):
    site = tmp_path / "site-packages"
    (site / "pkg").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.gguf").write_bytes(b"GGUF")
    alias = registry.Alias("installed", package="fake-package", filename="model.gguf")

    monkeypatch.setattr(registry, "distribution", lambda name: _FakeDistribution(site, ["../elsewhere/model.gguf"]))
    with pytest.raises(SparkGPTError, match=r"resolves to .*elsewhere/model\.gguf, outside the installed package"):
        registry.installed_path(alias)

    (site / "pkg" / "model.gguf").symlink_to(tmp_path / "elsewhere" / "model.gguf")  # a link out of the package
    monkeypatch.setattr(registry, "distribution", lambda name: _FakeDistribution(site, ["pkg/model.gguf"]))
    with pytest.raises(SparkGPTError, match="outside the installed package"):
        registry.installed_path(alias)

    (site / "pkg" / "model.gguf").unlink()
    (site / "pkg" / "model.gguf").write_bytes(b"GGUF")  # inside: found as before
    assert registry.installed_path(alias) == site / "pkg" / "model.gguf"
