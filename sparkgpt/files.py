"""File helpers every reader and writer shares: JSON with clear errors, and atomic directory writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sparkgpt.errors import SparkGPTError


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; any other content is a one-line error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SparkGPTError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SparkGPTError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise SparkGPTError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; anything else is a one-line error naming
    the file and line (`path:line: ...`)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SparkGPTError(f"{path}: no such JSONL file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SparkGPTError(f"{path}: not readable ({error})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SparkGPTError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise SparkGPTError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise SparkGPTError(f"{path}: no records")
    return records


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, marker: str = "config.json") -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` in one rename.

    A crash halfway leaves `out_dir` as it was (the temporary folder is removed). An existing `out_dir` is
    replaced only if it holds `marker` (it is one of our outputs); any other non-empty folder is refused.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).exists())):
        raise SparkGPTError(f"{out_dir}: exists and is not a checkpoint directory; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield staging
        fsync_tree(staging)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, retired / out_dir.name)
            os.rename(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.rename(staging, out_dir)
        _sync_directory(out_dir.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder` (and itself) reaches the disk: done before a rename makes them visible,
    so a crash never exposes a half-written tree (checkpoints and indexes nest folders)."""
    for path in [*folder.rglob("*"), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file beside `path`; on success it is fsynced and renamed over `path`, on failure removed,
    so `path` is always either its old content or the complete new one."""
    path = Path(path)
    if path.is_dir():
        raise SparkGPTError(f"{path}: is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
        _sync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_file`: a reader or a crash sees the old file or the new one."""
    with atomic_file(path) as file:
        file.write(text.encode("utf-8"))


@contextlib.contextmanager
def exclusive_lock(path: str | Path, busy: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created, with its folder) while the block runs; if another process (or
    another open of it here) holds it, a one-line SparkGPTError: `busy`, with the holder's pid. The kernel releases
    the lock when its holder dies, so a killed process never leaves it held; the file stays (removing it would let
    two processes lock two different files). Without flock (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (closed below, after the block)
    except OSError as error:
        raise SparkGPTError(f"{path}: cannot create this lock file ({error.strerror or error})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise SparkGPTError(f"{busy} (pid {holder})" if holder.isdigit() else busy) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def _sync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable, where the platform allows it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)


def cache_dir() -> Path:
    """Where fetched models live: $SPARKGPT_CACHE, else $XDG_CACHE_HOME/sparkgpt, else ~/.cache/sparkgpt."""
    if "SPARKGPT_CACHE" in os.environ:
        return Path(os.environ["SPARKGPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparkgpt"
