"""A hybrid search index over documents: BM25 (lexical) and sentence embeddings (dense), fused by rank.

    index = Index.build(["docs/"], "docs.index")     # or `sparkgpt index docs/ --out docs.index`
    hits = index.search("who founded the company?", k=4)

Storage, in the index folder: `CURRENT` names the live version folder, which holds `manifest.json` (embedder,
chunking, each file's content hash and chunk range), `chunks.jsonl`, `embeddings.npy` (float32, one row per chunk,
memory-mapped on load) and `bm25/` (bm25s' sparse score matrix). A build writes a new version folder, then replaces
`CURRENT` in one rename: a build killed at any point leaves the previous index as it was. A rebuild re-embeds only
the files whose content hash changed.

Why these pieces: bm25s is BM25 as sparse matrices (Lucene's scoring, numpy only, saved without pickle); the dense
side is an exact inner product over all rows, which answers 100k chunks within the latency goal on a CPU and needs
no training or tuning (an approximate index pays off only beyond that; see the README for the path past one
machine's memory). Rank fusion (Cormack et al. 2009) needs no score calibration between the two retrievers, whose
scores live on unrelated scales.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from tqdm import tqdm

from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_file, fsync_tree, read_json_object
from sparkgpt.lm import LM
from sparkgpt.lm import load as load_lm
from sparkgpt.rag.documents import Chunk, Skipped, file_hash, find_files, read_documents, split_into_chunks

DEFAULT_EMBEDDER = "minilm-l6"
# sentence-transformers embeds all-MiniLM-L6-v2's inputs up to 256 word pieces, [CLS] and [SEP] included (its
# max_seq_length): a chunk of 254 is embedded whole there too. The overlap holds about one sentence, so a fact cut
# by a boundary is whole in one neighbour.
DEFAULT_CHUNK_TOKENS = 254
DEFAULT_OVERLAP = 32
MODES = ("hybrid", "bm25", "dense")
RRF_K = 60  # the rank-fusion constant of Cormack et al., which damps the weight of the very first ranks
FORMAT = "sparkgpt-index"
FORMAT_VERSION = 1
_PROBE = "sparkgpt index probe: which embedder wrote these vectors?"


class Embedder:
    """A sentence-embedding model (an encoder LM) under the reference it was loaded from."""

    def __init__(self, lm: LM, name: str) -> None:
        self.lm, self.name = lm, name

    @classmethod
    def load(cls, ref: str | Path = DEFAULT_EMBEDDER) -> Embedder:
        return cls(load_lm(ref), str(ref))

    @property
    def dim(self) -> int:
        return self.lm.config.d_model

    def embed(self, texts: Sequence[str], progress: bool = False, desc: str = "embedding",
              dtype: str | None = None) -> np.ndarray:
        """float32 [N, dim], L2-normalised. dtype as `LM.embed`'s: an index's chunks take "auto" (bf16 where it
        was timed faster on this CPU); queries, graph names and the probe keep the weights' own (float32), so
        thresholds and the few vectors of a query mean the same on every CPU."""
        rows = []
        step = 256
        with tqdm(total=len(texts), desc=desc, unit="chunk", disable=not progress) as bar:
            for start in range(0, len(texts), step):
                rows.append(self.lm.embed(list(texts[start:start + step]), dtype=dtype).numpy())
                bar.update(min(step, len(texts) - start))
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)

    def probe(self) -> np.ndarray:
        """This model's vector for a fixed sentence: an index stores it to recognise the model that built it. In the
        weights' own dtype whatever its chunks took, so an index built where bf16 was chosen opens on a CPU that
        chose float32, and the reverse."""
        return self.lm.embed(_PROBE).numpy()


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"source": self.chunk.source, "text": self.chunk.text, "score": round(self.score, 6),
                "start": self.chunk.start, "end": self.chunk.end}


@dataclass
class BuildReport:
    files: int = 0
    documents: int = 0
    chunks: int = 0
    embedded: int = 0  # chunks embedded in this build
    reused: int = 0    # chunks kept from the previous build (their file unchanged)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.files} files, {self.documents} documents, {self.chunks} chunks "
                 f"({self.embedded} embedded, {self.reused} unchanged)"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s):")
            lines += [f"  {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


class Index:
    """Chunks of documents, searchable by words (BM25), by meaning (embeddings), or both fused."""

    def __init__(self, directory: Path, manifest: dict[str, Any], chunks: list[Chunk], embeddings: np.ndarray,
                 bm25: Any, embedder: Embedder | None = None) -> None:
        self.directory, self.manifest, self.chunks = directory, manifest, chunks
        self.embeddings, self.bm25 = embeddings, bm25
        self._embedder = embedder
        self.report: BuildReport | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = _checked(Embedder.load(self.manifest["embedder"]), self.manifest, self.directory)
        return self._embedder

    # -- building -----------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls, paths: Iterable[str | Path], out: str | Path, embedder: str | Embedder = DEFAULT_EMBEDDER,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = DEFAULT_OVERLAP, progress: bool = True,
    ) -> Index:
        """Index the files and folders `paths` into the folder `out` (text, Markdown, HTML, PDF, JSONL). An
        existing index there is updated: files whose content is unchanged keep their chunks and vectors."""
        out = Path(out)
        files = find_files(paths)
        if not files:
            raise SparkGPTError("no files to index")
        embedder = embedder if isinstance(embedder, Embedder) else Embedder.load(embedder)
        with _build_lock(out):
            return cls._build(files, out, embedder, chunk_tokens, overlap, progress)

    @classmethod
    def _build(cls, files: list[Path], out: Path, embedder: Embedder, chunk_tokens: int, overlap: int,
               progress: bool) -> Index:
        tokenizer = embedder.lm._require_tokenizer()
        limit = embedder.lm.config.max_seq_len - 2  # room for the encoder's [CLS] and [SEP]
        if chunk_tokens > limit:
            raise SparkGPTError(f"chunk size {chunk_tokens} is longer than the embedder's {limit}-token input")
        previous = _previous_build(out, embedder, chunk_tokens, overlap)
        report, skipped = BuildReport(files=len(files)), Skipped()
        chunks: list[Chunk] = []
        vectors: list[np.ndarray | None] = []  # per chunk: a reused vector, or None until embedded
        files_meta: dict[str, dict[str, Any]] = {}
        for path in tqdm(files, desc="reading", unit="file", disable=not progress):
            key = str(path.resolve())
            try:
                digest = file_hash(path)
                old = previous.files.get(key) if previous else None
                if old and old["sha256"] == digest:
                    first, count = old["first"], old["count"]
                    # The same file may be named another way this time (relative, absolute): cite it as named now.
                    file_chunks = [replace(c, source=str(path) + c.source[len(old["source"]):])
                                   for c in previous.chunks[first:first + count]]
                    file_vectors = list(previous.embeddings[first:first + count])
                    n_documents = old["documents"]
                    report.reused += count
                else:
                    documents = read_documents(path, str(path))
                    file_chunks = [c for d in documents for c in split_into_chunks(d, tokenizer, chunk_tokens,
                                                                                   overlap)]
                    file_vectors = [None] * len(file_chunks)
                    n_documents = len(documents)
            except (OSError, ValueError, UnicodeDecodeError) as error:
                skipped.add(path, str(error).splitlines()[0] if str(error) else type(error).__name__)
                continue
            files_meta[key] = {"source": str(path), "sha256": digest, "first": len(chunks),
                               "count": len(file_chunks), "documents": n_documents}
            report.documents += n_documents
            chunks += file_chunks
            vectors += file_vectors
        report.skipped = skipped.files
        if not chunks:
            raise SparkGPTError(f"no text found to index ({len(files)} file(s), {len(skipped.files)} unreadable)")
        todo = [i for i, v in enumerate(vectors) if v is None]
        fresh = embedder.embed([chunks[i].text for i in todo], progress=progress, dtype="auto")
        for row, i in enumerate(todo):
            vectors[i] = fresh[row]
        report.embedded, report.chunks = len(todo), len(chunks)
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "embedder": embedder.name, "dim": embedder.dim,
                    "embedder_probe": [round(float(x), 6) for x in embedder.probe()],
                    "chunk_tokens": chunk_tokens, "overlap": overlap, "chunks": len(chunks), "files": files_meta,
                    "skipped": skipped.files}
        index = _write(out, manifest, chunks, np.stack(vectors).astype(np.float32), embedder)
        index.report = report
        return index

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder | None = None) -> Index:
        """Open an index folder. `embedder`: the model to embed queries with; by default the one the index names
        (loaded on the first dense search). A model whose vectors differ from the builder's is refused."""
        directory = Path(directory)
        version = _current_version(directory)
        if version is None:
            raise SparkGPTError(f"{directory}: not a sparkgpt index (no CURRENT file); build one with `sparkgpt index`")
        folder = directory / version
        manifest = read_json_object(folder / "manifest.json")
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise SparkGPTError(f"{folder / 'manifest.json'}: not a version-{FORMAT_VERSION} sparkgpt index manifest")
        try:
            chunks = [Chunk(**json.loads(line)) for line in
                      (folder / "chunks.jsonl").read_text(encoding="utf-8").splitlines()]
            embeddings = np.load(folder / "embeddings.npy", mmap_mode="r", allow_pickle=False)
            bm25 = _load_bm25(folder / "bm25")
        except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
            raise SparkGPTError(f"{directory}: corrupt index ({type(error).__name__}: {error}); rebuild it with "
                                "`sparkgpt index`") from None
        expected = (manifest.get("chunks"), manifest.get("dim"))
        if len(chunks) != expected[0] or embeddings.ndim != 2 or embeddings.shape != expected \
                or embeddings.dtype != np.float32 or bm25.scores["num_docs"] != len(chunks):
            raise SparkGPTError(f"{directory}: corrupt index (the manifest says {expected[0]} chunks of {expected[1]} "
                                f"dimensions; the files disagree); rebuild it with `sparkgpt index`")
        if embedder is not None:
            _checked(embedder, manifest, directory)
        return cls(directory, manifest, chunks, embeddings, bm25, embedder)

    # -- searching ----------------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 4, mode: str = "hybrid") -> list[Hit]:
        """The `k` best chunks for `query`: "hybrid" fuses the BM25 and dense rankings by reciprocal rank (the
        score is the fused 1/(60 + rank) sum), "bm25" and "dense" use one retriever (their own scores)."""
        if not isinstance(query, str) or not query.strip():
            raise SparkGPTError("the query is empty")
        if mode not in MODES:
            raise SparkGPTError(f"search mode {mode!r} is not one of {', '.join(MODES)}")
        if k < 1:
            raise SparkGPTError(f"k must be at least 1, got {k}")
        k = min(k, len(self.chunks))
        if mode == "bm25":
            return self._hits(*_top(self.bm25_scores(query), k))
        if mode == "dense":
            return self._hits(*_top(self.dense_scores(query), k))
        pool = min(len(self.chunks), max(50, 10 * k))
        lexical = [row for row, value in zip(*_top(self.bm25_scores(query), pool), strict=True) if value > 0]
        rankings = [lexical, _top(self.dense_scores(query), pool)[0]]  # chunks without a query word rank nowhere
        fused: dict[int, float] = {}
        for ranking in rankings:
            for rank, row in enumerate(ranking):
                fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(fused, key=lambda row: (-fused[row], row))[:k]
        return self._hits(best, [fused[row] for row in best])

    def bm25_scores(self, query: str) -> np.ndarray:
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        return np.asarray(self.bm25.get_scores(tokens), dtype=np.float32)

    def dense_scores(self, query: str) -> np.ndarray:
        vector = self.embedder.embed([query])[0]
        return np.asarray(self.embeddings @ vector, dtype=np.float32)

    def _hits(self, rows: Sequence[int], scores: Sequence[float]) -> list[Hit]:
        return [Hit(self.chunks[row], float(score)) for row, score in zip(rows, scores, strict=True)]


def _top(scores: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """The k highest scores, best first (ties by row, so results are the same on every run)."""
    k = min(k, len(scores))
    candidates = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = sorted(candidates.tolist(), key=lambda row: (-float(scores[row]), row))
    return order, [float(scores[row]) for row in order]


def _checked(embedder: Embedder, manifest: dict[str, Any], directory: Path) -> Embedder:
    """`embedder`, if its vectors are the ones the index was built with; else a one-line error."""
    stored = np.asarray(manifest.get("embedder_probe", []), dtype=np.float32)
    if embedder.dim != manifest.get("dim") or stored.shape != (embedder.dim,) \
            or float(embedder.probe() @ stored) < 0.999:
        raise SparkGPTError(f"{directory}: this index was built with the embedder {manifest.get('embedder')!r}; "
                            f"{embedder.name!r} gives other vectors. Search with that embedder, or rebuild the "
                            f"index with `--embedder {embedder.name}`")
    return embedder


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """One build at a time per index folder: two would each delete the other's version when they finish."""
    ours = (".lock", ".staging-")  # what a first build killed before it finished leaves behind
    if out.exists() and (not out.is_dir() or (not (out / "CURRENT").exists()
                                              and any(not p.name.startswith(ours) for p in out.iterdir()))):
        raise SparkGPTError(f"{out}: exists and is not a sparkgpt index; refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SparkGPTError(f"{out}: another build is writing this index; wait for it to finish") from None
        yield


def _current_version(directory: Path) -> str | None:
    try:
        version = (directory / "CURRENT").read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not version or "/" in version or version.startswith("."):
        raise SparkGPTError(f"{directory / 'CURRENT'}: corrupt (expected the name of a version folder)")
    return version


@dataclass
class _Previous:
    files: dict[str, dict[str, Any]]
    chunks: list[Chunk]
    embeddings: np.ndarray


def _previous_build(out: Path, embedder: Embedder, chunk_tokens: int, overlap: int) -> _Previous | None:
    """The index already in `out`, if its chunks and vectors can be reused for this build."""
    if not (out / "CURRENT").exists():
        return None
    try:
        old = Index.load(out, embedder)
    except SparkGPTError:
        return None  # another embedder, or a damaged index: rebuild everything
    if (old.manifest["chunk_tokens"], old.manifest["overlap"]) != (chunk_tokens, overlap):
        return None
    return _Previous(old.manifest["files"], old.chunks, np.asarray(old.embeddings))


def _write(out: Path, manifest: dict[str, Any], chunks: list[Chunk], embeddings: np.ndarray,
           embedder: Embedder) -> Index:
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        tokens = bm25s.tokenize([c.text for c in chunks], stopwords="en", show_progress=False)
        bm25 = bm25s.BM25()
        bm25.index(tokens, show_progress=False)
        bm25.save(str(staging / "bm25"))
        with open(staging / "chunks.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in chunks)
        np.save(staging / "embeddings.npy", embeddings, allow_pickle=False)
        (staging / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False) + "\n", encoding="utf-8")
        fsync_tree(staging)
        version = f"v-{uuid.uuid4().hex[:12]}"
        os.rename(staging, out / version)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    with atomic_file(out / "CURRENT") as file:
        file.write(version.encode() + b"\n")
    for stale in out.iterdir():  # older versions, and staging folders of builds that were killed
        if stale.is_dir() and stale.name != version and (stale.name.startswith(("v-", ".staging-"))):
            shutil.rmtree(stale, ignore_errors=True)
    return Index.load(out, embedder)


def _load_bm25(folder: Path) -> Any:
    if not (folder / "params.index.json").is_file():
        raise FileNotFoundError(f"{folder}: no BM25 index")
    return bm25s.BM25.load(str(folder), mmap=True, show_progress=False)
