"""`sparkgpt prepare`: raw text -> train/val token files that training reads by memmap.

Inputs are text files, folders (recursive), JSONL files with a text field, or a built-in corpus name. The corpus
is streamed in chunks of about a megabyte, so it never has to fit in memory: one pass learns the vocabulary (char)
or trains the BPE, a second pass tokenises the chunks in worker processes, in order, straight to disk. The last
`val_fraction` of the tokens is the validation split (as nanoGPT splits Shakespeare: first 90%, last 10%).

Documents are joined like `cat`, a newline added after a document that lacks one; with a tokenizer that has an
end-of-text token, that token follows every document instead.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sparkgpt.checkpoint.load import load
from sparkgpt.checkpoint.registry import resolve
from sparkgpt.data.corpora import CORPORA, corpus_files
from sparkgpt.data.tokens import META_FILE, TRAIN_FILE, VAL_FILE, token_dtype
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_directory, write_json
from sparkgpt.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 20  # text per tokenisation task: large enough to amortise the process hop, small in memory
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Source:
    """One input file: how to read it (plain text or JSONL) and in which encoding."""

    path: Path
    kind: str  # "text" or "jsonl"
    encoding: str = "utf-8"


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int
    documents: int


def find_sources(inputs: Sequence[str | Path]) -> list[Source]:
    """Every file the inputs name: files as given, folders recursively (sorted, hidden entries skipped)."""
    if not inputs:
        raise SparkGPTError("prepare: no inputs given")
    sources: list[Source] = []
    for item in inputs:
        path = Path(item).expanduser()
        if str(item) in CORPORA and not path.exists():
            files, encoding = corpus_files(str(item))
            sources.extend(Source(file, "text", encoding) for file in files)
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts):
                    sources.append(_source_for(file))
        elif path.is_file():
            sources.append(_source_for(path))
        elif path.exists():
            raise SparkGPTError(f"{path}: not a regular file or folder")
        else:
            raise SparkGPTError(f"{item}: no such file or folder, and not a built-in corpus ({', '.join(CORPORA)})")
    return sources


def _source_for(path: Path) -> Source:
    return Source(path, "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text")


def read_documents(sources: Sequence[Source], text_field: str = "text") -> Iterator[tuple[str, bool, int]]:
    """(text piece, whether it ends a document, bytes read) in corpus order; pieces are about CHUNK_CHARS long.

    Errors name the file and line: unreadable files, text that is not in the file's encoding, bad JSONL lines.
    """
    for source in sources:
        try:
            handle = open(source.path, "rb")  # noqa: SIM115 (closed below; errors while opening get their message)
        except OSError as error:
            raise SparkGPTError(f"{source.path}: cannot read ({error.strerror or error})") from None
        with handle:
            if source.kind == "jsonl":
                yield from _jsonl_pieces(source, handle, text_field)
            else:
                yield from _text_pieces(source, handle)


def _decode(source: Source, raw: bytes, line_number: int) -> str:
    try:
        return raw.decode(source.encoding)
    except UnicodeDecodeError as error:
        raise SparkGPTError(
            f"{source.path}:{line_number}: not {source.encoding.upper()} text (byte {raw[error.start]:#04x} at column "
            f"{error.start + 1}); convert the file to UTF-8 or leave it out"
        ) from None


def _read_lines(source: Source, handle) -> Iterator[tuple[int, bytes]]:
    try:
        yield from enumerate(handle, start=1)
    except OSError as error:
        raise SparkGPTError(f"{source.path}: cannot read ({error.strerror or error})") from None


def _text_pieces(source: Source, handle) -> Iterator[tuple[str, bool, int]]:
    lines: list[str] = []
    size = raw_bytes = 0
    # One full piece is held back so that the piece marked as the document's end is never an empty remainder
    # (the newline-or-EOS that closes a document depends on how its last piece ends).
    held: tuple[str, int] | None = None
    for line_number, raw in _read_lines(source, handle):
        line = _decode(source, raw, line_number)
        lines.append(line)
        size += len(line)
        raw_bytes += len(raw)
        if size >= CHUNK_CHARS:  # pieces end at line ends, where a tokenizer's word splitting would split anyway
            if held is not None:
                yield held[0], False, held[1]
            held = "".join(lines), raw_bytes
            lines, size, raw_bytes = [], 0, 0
    if held is not None and not lines:
        yield held[0], True, held[1]
        return
    if held is not None:
        yield held[0], False, held[1]
    yield "".join(lines), True, raw_bytes


def _jsonl_pieces(source: Source, handle, text_field: str) -> Iterator[tuple[str, bool, int]]:
    for line_number, raw in _read_lines(source, handle):
        line = _decode(source, raw, line_number).strip()
        if not line:
            yield "", False, len(raw)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SparkGPTError(f"{source.path}:{line_number}: not valid JSON ({error.msg} at column {error.colno})") \
                from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            found = "no such field" if not isinstance(record, dict) or text_field not in record \
                else f"a {type(record[text_field]).__name__}"
            raise SparkGPTError(f"{source.path}:{line_number}: expected a JSON object with a string field "
                                f"{text_field!r} ({found})")
        text = record[text_field]
        for start in range(0, max(len(text), 1), CHUNK_CHARS):
            yield text[start:start + CHUNK_CHARS], start + CHUNK_CHARS >= len(text), len(raw) if start == 0 else 0


def build_tokenizer(spec: str, sources: Sequence[Source], text_field: str, progress: bool) -> Tokenizer:
    """`char`, `bpe:VOCAB` (both learned from the corpus, streaming) or a model reference (its tokenizer)."""
    if spec == "char" or spec.startswith("bpe:"):
        total = sum(source.path.stat().st_size for source in sources)
        with tqdm(total=total, unit="B", unit_scale=True, desc="learning vocabulary", disable=not progress) as bar:
            def texts() -> Iterator[str]:
                for text, _, raw_bytes in read_documents(sources, text_field):
                    bar.update(raw_bytes)
                    yield text
            if spec == "char":
                return Tokenizer.char_level(texts())
            try:
                vocab_size = int(spec.removeprefix("bpe:"))
            except ValueError:
                raise SparkGPTError(f"tokenizer {spec!r}: expected bpe:VOCAB with VOCAB a whole number") from None
            return Tokenizer.train_bpe(texts(), vocab_size)
    path = resolve(spec)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    _, tokenizer = load(spec, device="cpu")
    if tokenizer is None:
        raise SparkGPTError(f"{spec}: the model has no tokenizer")
    return tokenizer


# ---- tokenisation in worker processes ------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str, eos_token: str | None) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer as BackendTokenizer

    _worker_tokenizer = Tokenizer(BackendTokenizer.from_str(tokenizer_json), eos_token=eos_token)


def _encode_pieces(pieces: list[tuple[str, bool]], dtype: str) -> np.ndarray:
    """Token ids of consecutive pieces, each document closed by end-of-text (or a newline where it lacks one)."""
    tokenizer = _worker_tokenizer
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text, ends_document in pieces:
        if ends_document and eos is None and text and not text.endswith("\n"):
            text += "\n"
        if text:
            ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if ends_document and eos is not None:
            ids.append(eos)
    return np.asarray(ids, dtype=dtype)


def _tasks(sources: Sequence[Source], text_field: str) -> Iterator[tuple[list[tuple[str, bool]], int, int]]:
    """Pieces grouped into tasks of about CHUNK_CHARS: (pieces, bytes read, documents ended)."""
    pieces: list[tuple[str, bool]] = []
    size = raw_bytes = documents = 0
    document_has_text = False  # a document of only whitespace (an empty file or record) adds nothing, not even EOS
    for text, ends_document, piece_bytes in read_documents(sources, text_field):
        document_has_text = document_has_text or bool(text.strip())
        if text or (ends_document and document_has_text):
            pieces.append((text if document_has_text else "", ends_document and document_has_text))
        size += len(text)
        raw_bytes += piece_bytes
        documents += ends_document and document_has_text
        document_has_text = document_has_text and not ends_document
        if size >= CHUNK_CHARS:
            yield pieces, raw_bytes, documents
            pieces, size, raw_bytes, documents = [], 0, 0, 0
    if pieces or raw_bytes:
        yield pieces, raw_bytes, documents


@contextlib.contextmanager
def _worker_pool(workers: int, tokenizer: Tokenizer):
    """Worker processes that each hold the tokenizer; None (work in this process) when one worker is asked for."""
    if workers <= 1:
        _init_worker(tokenizer.backend.to_str(), tokenizer.eos_token)
        yield None
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # Forked children must not use the tokenizers library's own thread pool (it may be mid-use in this process);
    # telling them so up front also silences the library's warning about it.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context(method).Pool(
            workers, initializer=_init_worker, initargs=(tokenizer.backend.to_str(), tokenizer.eos_token))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _tokenize_to_file(
    sources: Sequence[Source], text_field: str, tokenizer: Tokenizer, dtype: str, path: Path, workers: int,
    progress: bool,
) -> tuple[int, int]:
    """Tokenise the corpus into `path` in corpus order; returns (tokens written, documents)."""
    total = sum(source.path.stat().st_size for source in sources)
    tokens = documents = 0
    with open(path, "wb") as out, _worker_pool(workers, tokenizer) as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        # A bounded window of tasks in flight keeps memory flat however large the corpus (Pool.imap would read
        # the whole input ahead); results are written in submission order, so the file is in corpus order.
        in_flight: collections.deque = collections.deque()

        def write_oldest() -> None:
            nonlocal tokens, documents
            result, raw_bytes, ended = in_flight.popleft()
            ids = result.get() if pool is not None else result
            ids.tofile(out)
            tokens += len(ids)
            documents += ended
            bar.update(raw_bytes)

        for pieces, raw_bytes, ended in _tasks(sources, text_field):
            if pool is None:
                in_flight.append((_encode_pieces(pieces, dtype), raw_bytes, ended))
            else:
                in_flight.append((pool.apply_async(_encode_pieces, (pieces, dtype)), raw_bytes, ended))
            while len(in_flight) > (2 * workers if pool is not None else 0):
                write_oldest()
        while in_flight:
            write_oldest()
    return tokens, documents


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str = "char",
    val_fraction: float = 0.1,
    text_field: str = "text",
    workers: int | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Tokenise `inputs` into `out_dir`: train.bin, val.bin, meta.json, tokenizer.json (written atomically)."""
    if not 0 < val_fraction < 1:
        raise SparkGPTError(f"val_fraction is {val_fraction}; expected a number between 0 and 1 (exclusive)")
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    sources = find_sources(inputs)
    if not sources:
        raise SparkGPTError(f"no input files found in {', '.join(map(str, inputs))}")
    built = build_tokenizer(tokenizer, sources, text_field, progress)
    if built.vocab_size == 0:
        raise SparkGPTError(f"the corpus is empty: no text in {', '.join(map(str, inputs))}")
    dtype = token_dtype(built.vocab_size)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, marker=META_FILE) as staging:
        everything = staging / "all.bin"
        n_tokens, documents = _tokenize_to_file(sources, text_field, built, dtype, everything, workers, progress)
        if n_tokens == 0:
            raise SparkGPTError(f"the corpus is empty: no text in {', '.join(map(str, inputs))}")
        val_tokens = max(1, round(n_tokens * val_fraction))
        train_tokens = n_tokens - val_tokens
        if train_tokens < 1:
            raise SparkGPTError(f"the corpus has only {n_tokens} token(s): too little to split into train and val")
        item = np.dtype(dtype).itemsize
        with open(everything, "rb") as source, open(staging / VAL_FILE, "wb") as target:
            source.seek(train_tokens * item)
            shutil.copyfileobj(source, target, length=1 << 24)
        os.truncate(everything, train_tokens * item)  # the training split is the file's head: no copy needed
        os.rename(everything, staging / TRAIN_FILE)
        built.save(staging)
        write_json(staging / META_FILE, {
            "format": "sparkgpt-tokens", "version": 1, "tokenizer": tokenizer, "vocab_size": built.vocab_size,
            "dtype": dtype, "eos_token_id": built.eos_token_id, "train_tokens": train_tokens,
            "val_tokens": val_tokens, "val_fraction": val_fraction, "documents": documents,
            "sources": [str(source.path) for source in sources[:1000]], "source_count": len(sources),
        })
    return PrepareResult(out_dir, built.vocab_size, dtype, train_tokens, val_tokens, documents)
