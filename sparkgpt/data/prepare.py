"""`sparkgpt prepare`: raw corpora -> cleaned, deduplicated token shards that training reads by memmap.

Inputs are files and folders of any format `data/readers.py` reads (text, JSONL plain or compressed, parquet,
MediaWiki XML dumps, Common Crawl WET, WARC) or a built-in corpus name. The pipeline, as the web-scale ones run it:

1. **clean**, one task per input file, in worker processes (or on Ray): read the documents, drop empty ones, apply
   the quality rules and the language filter (`data/clean.py`), and write the survivors with their exact-dedup hash
   and MinHash band hashes to a part file on disk, so memory stays flat whatever the corpus size;
2. **deduplicate** on the driver: the first copy of each exact duplicate is kept, then near duplicates (documents
   sharing a MinHash band) are removed, one band at a time over the band hashes on disk;
3. **tokenize**: the vocabulary is learned from the kept documents (`char`, `bpe:N`) or taken from a model; tasks of
   about a megabyte of documents are tokenised in order into shards of at most `shard_tokens`; the last
   `val_fraction` of the tokens is the validation split (as nanoGPT splits Shakespeare: first 90%, last 10%).

Documents are joined like `cat`, a newline added after a document that lacks one; with a tokenizer that has an
end-of-text token, that token follows every document instead. A bad file or record is skipped, named on stderr and
counted in meta.json; the rest of the corpus is still prepared. What each stage kept and removed is in meta.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sparkgpt.checkpoint.load import load
from sparkgpt.checkpoint.registry import resolve
from sparkgpt.data.clean import CleanConfig, MinHasher, document_hash, filter_document, near_duplicates
from sparkgpt.data.corpora import CORPORA, corpus_files
from sparkgpt.data.engine import LocalEngine, RayEngine, make_engine
from sparkgpt.data.readers import FORMATS, WEB_FORMATS, Skip, detect_format, read_documents
from sparkgpt.data.tokens import META_FILE, SHARD_TOKENS, ShardWriter, split_tail, token_dtype
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_directory, write_json
from sparkgpt.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 20  # text per tokenisation task: large enough to amortise the process hop, small in memory
SHOWN_SKIPS = 20  # skipped records named on stderr and in meta.json; the count covers all of them
_FLUSH_DOCUMENTS = 1024  # part-file rows buffered per write


@dataclass(frozen=True)
class Source:
    """One input file: its format (None: not one we read) and, for text, its encoding."""

    path: Path
    format: str | None
    encoding: str = "utf-8"


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int
    documents: int
    shards: int = 1
    stages: list[dict] = field(default_factory=list)
    skipped: int = 0
    duplicates: int = 0


def find_sources(inputs: Sequence[str | Path], format: str | None = None) -> list[Source]:
    """Every file the inputs name: files as given, folders recursively (sorted, hidden entries skipped)."""
    if not inputs:
        raise SparkGPTError("prepare: no inputs given")
    if format is not None and format not in FORMATS:
        raise SparkGPTError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    sources: list[Source] = []
    for item in inputs:
        path = Path(item).expanduser()
        if str(item) in CORPORA and not path.exists():
            files, encoding = corpus_files(str(item))
            sources.extend(Source(file, "text", encoding) for file in files)
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts):
                    sources.append(Source(file, format or detect_format(file)))
        elif path.is_file():
            sources.append(Source(path, format or detect_format(path)))
        elif path.exists():
            raise SparkGPTError(f"{path}: not a regular file or folder")
        else:
            raise SparkGPTError(f"{item}: no such file or folder, and not a built-in corpus ({', '.join(CORPORA)})")
    return sources


# ---- stage 1: clean each file into a part on disk -------------------------------------------------------------

class _Part:
    """The files of one input's surviving documents: texts (UTF-8, concatenated), byte ends, characters, exact
    hashes and MinHash band hashes, one row per document."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def path(self, kind: str) -> Path:
        return Path(f"{self.prefix}.{kind}")

    def ends(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Byte ends of documents start..stop (all by default), read without loading the rest."""
        count = -1 if stop is None else stop - start
        return np.fromfile(self.path("ends"), dtype=np.int64, offset=8 * start, count=count)

    def texts(self, start: int, stop: int, keep: np.ndarray | None = None) -> Iterator[str]:
        """Documents start..stop (those `keep` marks), read from the part's text file."""
        if stop <= start:
            return
        ends = self.ends(max(start - 1, 0), stop)
        begin = int(ends[0]) if start else 0
        ends = ends[1:] if start else ends
        with open(self.path("txt"), "rb") as file:
            file.seek(begin)
            raw = file.read(int(ends[-1]) - begin)
        offset = 0
        for index, end in enumerate((ends - begin).tolist()):
            if keep is None or keep[index]:
                yield raw[offset:end].decode("utf-8")
            offset = end


class CleanFile:
    """Worker: one input file -> its part (documents that pass the filters) and the counts of what was removed."""

    def __init__(self, clean_json: str, text_field: str) -> None:
        values = json.loads(clean_json)
        values["languages"] = tuple(values["languages"])
        self.config = CleanConfig(**values)
        self.text_field = text_field
        self.hasher = MinHasher(self.config) if self.config.near_dedup else None

    def __call__(self, task: dict) -> dict:
        part = _Part(task["part"])
        web = task["format"] in WEB_FORMATS
        stats: dict = {"documents": 0, "characters": 0, "kept": 0, "kept_characters": 0, "removed": {},
                       "skipped": 0, "skips": []}
        rows: dict[str, list] = {"txt": [], "ends": [], "chars": [], "hash": [], "bands": []}
        end = 0
        files = {kind: open(part.path(kind), "wb") for kind in rows}  # noqa: SIM115 (closed below)
        try:
            documents = read_documents(Path(task["path"]), task["format"], text_field=self.text_field,
                                       encoding=task["encoding"])
            for document in documents:
                if isinstance(document, Skip):
                    stats["skipped"] += 1
                    if len(stats["skips"]) < SHOWN_SKIPS:
                        where = f"{document.source}:{document.record}" if document.record else document.source
                        stats["skips"].append(f"{where}: {document.reason}")
                    continue
                text = document.text
                stats["documents"] += 1
                stats["characters"] += len(text)
                kept, rule = (None, "empty") if not text.strip() else filter_document(text, self.config, web)
                if kept is None:
                    removed = stats["removed"].setdefault(rule, [0, 0])
                    removed[0] += 1
                    removed[1] += len(text)
                    continue
                raw = kept.encode("utf-8")
                end += len(raw)
                stats["kept"] += 1
                stats["kept_characters"] += len(kept)
                rows["txt"].append(raw)
                rows["ends"].append(end)
                rows["chars"].append(len(kept))
                rows["hash"].append(document_hash(kept))
                if self.hasher is not None:
                    rows["bands"].append(self.hasher.band_hashes(kept))
                if len(rows["ends"]) >= _FLUSH_DOCUMENTS:
                    self._flush(rows, files)
            self._flush(rows, files)
        finally:
            for file in files.values():
                file.close()
        return {"stats": json.dumps(stats)}

    @staticmethod
    def _flush(rows: dict[str, list], files: dict) -> None:
        files["txt"].write(b"".join(rows["txt"]))
        np.asarray(rows["ends"], dtype=np.int64).tofile(files["ends"])
        np.asarray(rows["chars"], dtype=np.int64).tofile(files["chars"])
        np.asarray(rows["hash"], dtype=np.uint64).tofile(files["hash"])
        if rows["bands"]:
            np.stack(rows["bands"]).astype(np.uint64).tofile(files["bands"])
        for values in rows.values():
            values.clear()


# ---- stage 2: deduplicate across the whole corpus ------------------------------------------------------------

def _deduplicate(parts: list[_Part], config: CleanConfig, work: Path) -> tuple[list[np.ndarray], dict, dict]:
    """Per part, which documents to keep; and the exact and near duplicates removed (documents, characters)."""
    counts = [len(part.ends()) for part in parts]
    chars = np.concatenate([np.fromfile(part.path("chars"), dtype=np.int64) for part in parts] or [np.zeros(0)])
    keep = np.ones(sum(counts), dtype=bool)
    if config.exact_dedup and len(keep):
        hashes = np.concatenate([np.fromfile(part.path("hash"), dtype=np.uint64) for part in parts])
        _, first = np.unique(hashes, return_index=True)  # the first copy of each text, in corpus order
        keep[:] = False
        keep[first] = True
    exact = {"documents": int((~keep).sum()), "characters": int(chars[~keep].sum())}
    near = {"documents": 0, "characters": 0}
    if config.near_dedup and keep.any():
        survivors = np.flatnonzero(keep)
        bands = np.memmap(work / "bands.bin", dtype=np.uint64, mode="w+", shape=(len(survivors), config.bands))
        row = start = 0
        for part, count in zip(parts, counts, strict=True):
            if count:
                rows = np.memmap(part.path("bands"), dtype=np.uint64, mode="r", shape=(count, config.bands))
                chosen = keep[start:start + count]
                bands[row:row + int(chosen.sum())] = rows[chosen]
                row += int(chosen.sum())
            start += count
        removed = survivors[near_duplicates(bands)]
        del bands
        keep[removed] = False
        near = {"documents": len(removed), "characters": int(chars[removed].sum())}
    return np.split(keep, np.cumsum(counts)[:-1]), exact, near


# ---- stage 3: tokenize into shards ---------------------------------------------------------------------------

class TokenizeDocuments:
    """Worker: documents start..stop of a part (those the mask keeps) -> token ids, each document closed by
    end-of-text (or a newline where the tokenizer has none and the document lacks one)."""

    def __init__(self, tokenizer_json: str, eos_token: str | None, dtype: str) -> None:
        from tokenizers import Tokenizer as BackendTokenizer

        self.tokenizer = Tokenizer(BackendTokenizer.from_str(tokenizer_json), eos_token=eos_token)
        self.dtype = dtype

    def __call__(self, task: dict) -> dict:
        keep = np.frombuffer(task["keep"], dtype=bool)
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        documents = characters = 0
        for text in _Part(task["part"]).texts(task["start"], task["stop"], keep):
            documents += 1
            characters += len(text)
            if eos is None and not text.endswith("\n"):
                text += "\n"
            ids.extend(self.tokenizer.encode(text, add_special_tokens=False))
            if eos is not None:
                ids.append(eos)
        return {"tokens": np.asarray(ids, dtype=self.dtype).tobytes(), "documents": documents,
                "characters": characters}


def _tokenize_tasks(parts: list[_Part], keeps: list[np.ndarray]) -> Iterator[dict]:
    """Ranges of about CHUNK_CHARS bytes of each part's documents, with the mask of those kept."""
    for part, keep in zip(parts, keeps, strict=True):
        ends = part.ends()
        start = 0
        while start < len(ends):
            begin = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, begin + CHUNK_CHARS, side="left")) + 1)
            stop = min(stop, len(ends))
            if keep[start:stop].any():
                yield {"part": part.prefix, "start": start, "stop": stop, "keep": keep[start:stop].tobytes()}
            start = stop


def build_tokenizer(spec: str, texts: Iterator[str] | None = None) -> Tokenizer:
    """`char`, `bpe:VOCAB` (both learned from `texts`, streaming), a folder holding tokenizer.json, or a model
    reference (its tokenizer)."""
    if spec == "char" or spec.startswith("bpe:"):
        if spec == "char":
            return Tokenizer.char_level(texts or iter(()))
        try:
            vocab_size = int(spec.removeprefix("bpe:"))
        except ValueError:
            raise SparkGPTError(f"tokenizer {spec!r}: expected bpe:VOCAB with VOCAB a whole number") from None
        return Tokenizer.train_bpe(texts or iter(()), vocab_size)
    if (Path(spec) / "tokenizer.json").is_file():  # a model folder, or a prepared data folder to share a vocabulary
        return Tokenizer.from_dir(Path(spec))
    path = resolve(spec)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    _, tokenizer = load(spec, device="cpu")
    if tokenizer is None:
        raise SparkGPTError(f"{spec}: the model has no tokenizer")
    return tokenizer


def _check_tokenizer_spec(spec: str) -> None:
    """Refuse a malformed `bpe:` before the corpus is read, not after."""
    if spec.startswith("bpe:") and not spec.removeprefix("bpe:").isdigit():
        raise SparkGPTError(f"tokenizer {spec!r}: expected bpe:VOCAB with VOCAB a whole number")


def _stage(name: str, before: tuple[int, int], removed: tuple[int, int], by: dict | None = None) -> dict:
    stage = {"stage": name, "kept_documents": before[0] - removed[0], "kept_characters": before[1] - removed[1],
             "removed_documents": removed[0], "removed_characters": removed[1]}
    if by:
        stage["removed_by"] = by
    return stage


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str = "char",
    val_fraction: float = 0.1,
    text_field: str = "text",
    workers: int | None = None,
    progress: bool = True,
    format: str | None = None,
    clean: CleanConfig | None = None,
    engine: str = "local",
    shard_tokens: int = SHARD_TOKENS,
) -> PrepareResult:
    """Clean, deduplicate and tokenise `inputs` into `out_dir`: token shards, meta.json and tokenizer.json,
    written atomically (a failed run leaves `out_dir` as it was)."""
    if not 0 < val_fraction < 1:
        raise SparkGPTError(f"val_fraction is {val_fraction}; expected a number between 0 and 1 (exclusive)")
    if shard_tokens < 1:
        raise SparkGPTError(f"shard_tokens is {shard_tokens}; expected a positive number of tokens")
    _check_tokenizer_spec(tokenizer)
    clean = clean or CleanConfig()
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    sources = find_sources(inputs, format)
    if not sources:
        raise SparkGPTError(f"no input files found in {', '.join(map(str, inputs))}")
    runner = make_engine(engine, workers)
    try:
        return _prepare(sources, inputs, Path(out_dir), tokenizer, val_fraction, text_field, clean, runner,
                        shard_tokens, progress)
    finally:
        runner.close()


def _prepare(sources: list[Source], inputs: Sequence[str | Path], out_dir: Path, tokenizer: str, val_fraction: float,
             text_field: str, clean: CleanConfig, runner: LocalEngine | RayEngine, shard_tokens: int,
             progress: bool) -> PrepareResult:
    with atomic_directory(out_dir, marker=META_FILE) as staging:
        work = staging / "work"
        work.mkdir()
        parts = [_Part(str(work / f"part-{index:05d}")) for index in range(len(sources))]
        tasks = [{"path": str(source.path), "format": source.format, "encoding": source.encoding,
                  "part": part.prefix} for source, part in zip(sources, parts, strict=True)]
        sizes = [source.path.stat().st_size if source.path.exists() else 0 for source in sources]
        totals: Counter = Counter()
        removed_by: dict[str, list[int]] = {}
        shown: list[str] = []
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="cleaning", disable=not progress) as bar:
            results = runner.map(CleanFile, (json.dumps(dataclasses.asdict(clean)), text_field), tasks)
            for size, result in zip(sizes, results, strict=True):
                stats = json.loads(result["stats"])
                for key in ("documents", "characters", "kept", "kept_characters", "skipped"):
                    totals[key] += stats[key]
                for rule, (documents, characters) in stats["removed"].items():
                    entry = removed_by.setdefault(rule, [0, 0])
                    entry[0] += documents
                    entry[1] += characters
                for line in stats["skips"]:
                    if len(shown) < SHOWN_SKIPS:
                        shown.append(line)
                        tqdm.write(f"sparkgpt: skipped {line}", file=sys.stderr)
                bar.update(size)
        if totals["skipped"] > len(shown):
            print(f"sparkgpt: skipped {totals['skipped']:,} records in all", file=sys.stderr)

        keeps, exact, near = _deduplicate(parts, clean, work)
        documents = (totals["documents"], totals["characters"])

        def rule_total(rules: list[str]) -> tuple[int, int]:
            return (sum(removed_by[r][0] for r in rules), sum(removed_by[r][1] for r in rules))

        quality_rules = [rule for rule in removed_by if rule not in ("empty", "language")]
        stages = [{"stage": "read", "documents": documents[0], "characters": documents[1],
                   "skipped_records": totals["skipped"]}]
        for name, rules in (("empty", ["empty"]), ("quality", quality_rules), ("language", ["language"])):
            rules = [rule for rule in rules if rule in removed_by]
            removed = rule_total(rules)
            stages.append(_stage(name, documents, removed, {r: removed_by[r][0] for r in rules}))
            documents = (documents[0] - removed[0], documents[1] - removed[1])
        if documents[1] != totals["kept_characters"]:  # the C4 line rules shortened kept documents
            documents = (documents[0], totals["kept_characters"])
        for name, removed in (("exact duplicates", exact), ("near duplicates", near)):
            stages.append(_stage(name, documents, (removed["documents"], removed["characters"])))
            documents = (documents[0] - removed["documents"], documents[1] - removed["characters"])

        def kept_texts() -> Iterator[str]:
            for task in _tokenize_tasks(parts, keeps):  # a megabyte at a time: memory stays flat
                yield from _Part(task["part"]).texts(task["start"], task["stop"], np.frombuffer(task["keep"], bool))

        with tqdm(total=documents[1], unit="char", unit_scale=True, desc="learning vocabulary",
                  disable=not progress or not (tokenizer == "char" or tokenizer.startswith("bpe:"))) as bar:
            def counted() -> Iterator[str]:
                for text in kept_texts():
                    bar.update(len(text))
                    # A char vocabulary needs the newline that joins documents even if no document holds one.
                    yield text if tokenizer != "char" or text.endswith("\n") else text + "\n"
            built = build_tokenizer(tokenizer, counted())
        if built.vocab_size == 0 or documents[0] == 0:
            raise SparkGPTError(f"the corpus is empty: no text in {', '.join(map(str, inputs))}")
        dtype = token_dtype(built.vocab_size)

        writer = ShardWriter(staging, "train", dtype, shard_tokens)
        written = Counter()
        with tqdm(total=documents[1], unit="char", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            init = (built.backend.to_str(), built.eos_token, dtype)
            for result in runner.map(TokenizeDocuments, init, _tokenize_tasks(parts, keeps)):
                writer.write(np.frombuffer(result["tokens"], dtype=dtype))
                written["documents"] += result["documents"]
                bar.update(result["characters"])
        writer.close()
        shutil.rmtree(work)
        n_tokens = writer.tokens
        stages.append({"stage": "tokenize", "documents": written["documents"], "characters": documents[1],
                       "tokens": n_tokens})
        if n_tokens == 0:
            raise SparkGPTError(f"the corpus is empty: no text in {', '.join(map(str, inputs))}")
        val_tokens = max(1, round(n_tokens * val_fraction))
        train_tokens = n_tokens - val_tokens
        if train_tokens < 1:
            raise SparkGPTError(f"the corpus has only {n_tokens} token(s): too little to split into train and val")
        train_shards, val_shards = split_tail(staging, writer.shards, dtype, val_tokens, "val", shard_tokens)
        built.save(staging)
        duplicates = exact["documents"] + near["documents"]
        write_json(staging / META_FILE, {
            "format": "sparkgpt-tokens", "version": 2, "tokenizer": tokenizer, "vocab_size": built.vocab_size,
            "dtype": dtype, "eos_token_id": built.eos_token_id, "train_tokens": train_tokens,
            "val_tokens": val_tokens, "val_fraction": val_fraction, "documents": written["documents"],
            "shard_tokens": shard_tokens, "train_shards": train_shards, "val_shards": val_shards,
            "stages": stages, "duplicates": duplicates, "skipped": {"count": totals["skipped"], "examples": shown},
            "clean": dataclasses.asdict(clean), "engine": runner.name,
            "sources": [str(source.path) for source in sources[:1000]], "source_count": len(sources),
        })
    return PrepareResult(out_dir, built.vocab_size, dtype, train_tokens, val_tokens, written["documents"],
                         len(train_shards) + len(val_shards), stages, totals["skipped"], duplicates)
