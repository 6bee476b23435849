"""Streaming document readers for pretraining corpora: text, JSONL, Parquet, MediaWiki dumps, WET and WARC files.

Every reader yields `Document`s (plain text, in file order) and `Skip`s (what was left out and why) without ever
holding a whole file in memory, so that a corpus of dumps far larger than RAM can be prepared in one pass. Bad input
is reported per record as a `Skip` rather than raised, since one broken line or cut-short download should not stop
the preparation of terabytes; only a mistake in the caller's own options raises `SparkGPTError`.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from xml.etree.ElementTree import ParseError

import mwparserfromhell
import mwxml
import mwxml.errors
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from fastwarc.warc import ArchiveIterator, WarcRecordType
from mwparserfromhell.nodes import ExternalLink, Heading, HTMLEntity, Node, Tag, Text, Wikilink
from mwparserfromhell.wikicode import Wikicode
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding

from sparkgpt.errors import SparkGPTError


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from (`record` names the place in the file, for messages)."""

    text: str
    source: str
    record: str


@dataclass(frozen=True)
class Skip:
    """Something left out of the corpus: the file, the record ("" for the whole file) and a one-line reason."""

    source: str
    record: str
    reason: str


FORMATS: tuple[str, ...] = ("text", "jsonl", "parquet", "mediawiki", "wet", "warc")
WEB_FORMATS = frozenset({"wet", "warc"})

_SNIFF_BYTES = 8192
_SUFFIX_FORMATS: tuple[tuple[str, str], ...] = (  # longest first where one name ends another
    (".warc.wet.gz", "wet"), (".warc.wet", "wet"), (".wet.gz", "wet"), (".wet", "wet"),
    (".warc.gz", "warc"), (".warc", "warc"),
    (".xml.bz2", "mediawiki"), (".xml.gz", "mediawiki"), (".xml", "mediawiki"),
    (".parquet", "parquet"),
    *((f"{stem}{packing}", "jsonl") for stem in (".jsonl", ".ndjson") for packing in ("", ".gz", ".zst", ".zstd")),
    (".txt", "text"), (".md", "text"), (".rst", "text"), (".text", "text"),
)
_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_CHUNK = 1 << 20  # bytes per read: large enough to amortise calls, small in memory
_ZSTD_STEP = 1 << 13  # compressed bytes per decompression step: prose expands about 4x, so output stays small
_TAIL_CHUNK = 1 << 16  # compressed bytes per step of the gzip end check: its output is discarded, so keep it small
_PARQUET_BATCH_ROWS = 256  # rows per batch: documents can be long, so a batch stays a few megabytes
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})


class _Corrupt(Exception):
    """A damaged archive that the underlying library read past without complaint (we noticed it ourselves)."""


# Exceptions that mean the file's bytes are damaged (as opposed to unreadable, an OSError that carries an errno).
_CORRUPTION = (EOFError, OSError, zlib.error, zstandard.ZstdError, ParseError, mwxml.errors.MalformedXML,
               pa.ArrowException, _Corrupt)


def detect_format(path: Path) -> str | None:
    """The format a file's name says (case-insensitive); an unknown suffix is "text" if its start has no NUL byte.

    Raises OSError when an unknown-suffix file cannot be read to check.
    """
    name = path.name.lower()
    for suffix, format in _SUFFIX_FORMATS:
        if name.endswith(suffix):
            return format
    if not Path(name).suffix:
        return "text"
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    return None if b"\0" in head else "text"


def read_documents(path: Path, format: str | None = None, *, text_field: str = "text", encoding: str = "utf-8",
                   max_document_chars: int = 1 << 24) -> Iterator[Document | Skip]:
    """Documents and Skips from one file, streaming; `format` None detects it from the name.

    A truncated or corrupt archive yields the documents before the damage, then one Skip "after" the last record.
    A `format` that is not one of FORMATS raises SparkGPTError at once (the caller's mistake, not the file's).
    """
    if format is not None and format not in FORMATS:
        raise SparkGPTError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    return _read(path, format, text_field, encoding, max_document_chars)


def _read(path: Path, format: str | None, text_field: str, encoding: str,
          max_document_chars: int) -> Iterator[Document | Skip]:
    source = str(path)
    last_record = ""
    try:
        format = format or detect_format(path)
        if format is None:
            yield Skip(source, "", f"unknown format (expected one of: {', '.join(FORMATS)}; choose one with --format)")
            return
        readers: dict[str, Callable[[], Iterator[Document | Skip]]] = {
            "text": lambda: _read_text(path, encoding, max_document_chars),
            "jsonl": lambda: _read_jsonl(path, text_field, encoding),
            "parquet": lambda: _read_parquet(path, text_field),
            "mediawiki": lambda: _read_mediawiki(path),
            "wet": lambda: _read_web(path, html=False),
            "warc": lambda: _read_web(path, html=True),
        }
        for item in readers[format]():
            yield item
            last_record = item.record or last_record
    except _CORRUPTION as error:
        where = f"after {last_record}" if last_record else ""
        if isinstance(error, OSError) and error.errno is not None:
            yield Skip(source, where, f"cannot read ({error.strerror or error})")
        else:
            message = " ".join(str(error).split()) or type(error).__name__
            yield Skip(source, where, f"truncated or corrupt archive ({message})")


# ---- compressed streams --------------------------------------------------------------------------------------


class _ZstdStream(io.RawIOBase):
    """Zstandard decompression across frames that raises EOFError on a cut-short frame.

    zstandard's own stream_reader returns a clean end of file for a truncated frame, which would hide the damage.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._frame_started = False
        self._pending = b""
        self._input = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            if self._frame.eof:  # what follows a frame's end is the start of the next frame
                self._input = memoryview(self._frame.unused_data + self._input.tobytes())
                self._frame, self._frame_started = self._decompressor.decompressobj(), False
            if not self._input:
                self._input = memoryview(self._raw.read(_READ_CHUNK))
                if not self._input:
                    if self._frame_started:
                        raise EOFError("Compressed file ended before the end of a zstd frame")
                    return 0
            # Small steps of input bound the output of one step (the decompressor returns all of it at once).
            step, self._input = self._input[:_ZSTD_STEP], self._input[_ZSTD_STEP:]
            self._frame_started = True
            self._pending = self._frame.decompress(step.tobytes())
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_decompressed(path: Path) -> IO[bytes]:
    """A binary stream of the file's contents, decompressed by its magic bytes (gzip, bzip2, zstd) or as it is."""
    raw = open(path, "rb")  # noqa: SIM115 (the returned stream owns it)
    try:
        magic = raw.read(4)
        raw.seek(0)
    except OSError:
        raw.close()
        raise
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if magic.startswith(_BZIP2_MAGIC):
        return bz2.BZ2File(raw, "rb")  # type: ignore[return-value]
    if magic.startswith(_ZSTD_MAGIC):
        return io.BufferedReader(_ZstdStream(raw), _READ_CHUNK)  # type: ignore[return-value]
    return raw


# ---- text and JSONL ------------------------------------------------------------------------------------------


def _not_encoded(encoding: str, byte: int, column: int) -> str:
    return (f"not {encoding.upper()} text (byte {byte:#04x} at column {column}); "
            "convert the file to UTF-8 or leave it out")


class _BadText(Exception):
    """Text not in the file's encoding, at `line` of the file; `reason` is the Skip's."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line, self.reason = line, reason


def _text_pieces(handle: IO[bytes], encoding: str) -> Iterator[str]:
    """The file's text in order: whole lines, and lines longer than _READ_CHUNK bytes in several pieces."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line, column = 1, 0
    while raw := handle.readline(_READ_CHUNK):
        try:
            text = decoder.decode(raw)
        except UnicodeDecodeError as error:
            raise _BadText(line, _not_encoded(encoding, error.object[error.start], column + error.start + 1)) \
                from None
        yield text
        line, column = (line + 1, 0) if raw.endswith(b"\n") else (line, column + len(raw))
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise _BadText(line, f"not {encoding.upper()} text (the file ends inside a character); convert the file to "
                             "UTF-8 or leave it out") from None


def _read_text(path: Path, encoding: str, max_chars: int) -> Iterator[Document | Skip]:
    source = str(path)
    with open(path, "rb") as handle:
        # A file that may need splitting is checked whole first: a decoding error skips the file, parts included.
        if path.stat().st_size > max_chars:
            try:
                for _ in _text_pieces(handle, encoding):
                    pass
            except _BadText as error:
                yield Skip(source, f"line {error.line}", error.reason)
                return
            handle.seek(0)
        pieces: list[str] = []
        size = part = 0
        try:
            for text in _text_pieces(handle, encoding):
                if pieces and size + len(text) > max_chars:
                    part += 1
                    yield Document("".join(pieces), source, f"part {part}")
                    pieces, size = [], 0
                pieces.append(text)
                size += len(text)
        except _BadText as error:
            yield Skip(source, f"line {error.line}", error.reason)
            return
    text = "".join(pieces)
    if part:
        yield Document(text, source, f"part {part + 1}")
    elif not text.strip():
        yield Skip(source, "", "no text")
    else:
        yield Document(text, source, "")


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _read_jsonl(path: Path, text_field: str, encoding: str) -> Iterator[Document | Skip]:
    source = str(path)
    with _open_decompressed(path) as handle:
        for number, raw in enumerate(handle, start=1):
            record = f"line {number}"
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as error:
                yield Skip(source, record, _not_encoded(encoding, raw[error.start], error.start + 1))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                yield Skip(source, record, f"not valid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(value, dict):
                found = f"the line is a JSON {_JSON_TYPES.get(type(value), 'value')}, not an object"
            elif text_field not in value:
                found = f"fields: {', '.join(list(value)[:10]) or 'none'}"
            elif not isinstance(value[text_field], str):
                found = f"it is a JSON {_JSON_TYPES.get(type(value[text_field]), 'value')}"
            else:
                text = value[text_field]
                yield Document(text, source, record) if text.strip() else Skip(source, record, "no text")
                continue
            yield Skip(source, record, f"no string field {text_field!r} ({found}); choose one with --text-field")


# ---- Parquet -------------------------------------------------------------------------------------------------


def _read_parquet(path: Path, text_field: str) -> Iterator[Document | Skip]:
    source = str(path)
    with pq.ParquetFile(path) as parquet:
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            yield Skip(source, "", f"no column {text_field!r} (columns: {', '.join(schema.names) or 'none'}); "
                                   "choose one with --text-field")
            return
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
                or pa.types.is_string_view(column_type)):
            yield Skip(source, "", f"column {text_field!r} holds {column_type}, not text")
            return
        row = 0
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if isinstance(text, str) and text.strip():
                    yield Document(text, source, f"row {row}")
                else:
                    yield Skip(source, f"row {row}", "no text")


# ---- MediaWiki -----------------------------------------------------------------------------------------------

_DROPPED_TAGS = frozenset({"ref", "references", "table", "gallery", "math", "score", "timeline", "templatedata",
                           "syntaxhighlight", "imagemap", "graph", "mapframe", "hr", "li", "dt", "dd"})
_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
_TRAILING_SPACES = re.compile(r"[ \t]+$", re.MULTILINE)


def _plain(code: Wikicode) -> str:
    return "".join(_plain_node(node) for node in code.nodes)


def _plain_node(node: Node) -> str:
    """What a reader sees of one wikitext node, minus templates, references, tables, files and categories."""
    if isinstance(node, Text):
        return node.value
    if isinstance(node, Wikilink):
        if str(node.title).strip().lower().startswith(_DROPPED_LINK_PREFIXES):
            return ""
        return _plain(node.text) if node.text is not None else _plain(node.title)
    if isinstance(node, Heading):
        return _plain(node.title).strip()
    if isinstance(node, Tag):
        tag = str(node.tag).strip().lower()
        if tag in _DROPPED_TAGS:
            return ""
        if tag == "br":
            return "\n"
        return _plain(node.contents) if node.contents is not None else ""
    if isinstance(node, ExternalLink):
        return _plain(node.title) if node.title is not None else str(node.url) if not node.brackets else ""
    if isinstance(node, HTMLEntity):
        return node.normalize()
    return ""  # templates, comments, template arguments ({{{1}}}): markup, not text


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of an article's wikitext: what a reader of the rendered page reads, without its apparatus."""
    text = _plain(mwparserfromhell.parse(wikitext))
    text = _TRAILING_SPACES.sub("", _INNER_SPACES.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


def _read_mediawiki(path: Path) -> Iterator[Document | Skip]:
    source = str(path)
    with _open_decompressed(path) as handle:
        for page in mwxml.Dump.from_file(handle):
            latest = None
            for revision in page:  # revisions come oldest first; reading them all also moves the parser past the page
                latest = revision
            if page.namespace != 0 or page.redirect is not None or latest is None:
                continue
            record = f"page {page.title!r}"
            text = wikitext_to_text(latest.text or "")
            yield Document(text, source, record) if text else Skip(source, record, "no text")


# ---- WET and WARC --------------------------------------------------------------------------------------------


def _check_gzip_tail(path: Path, offset: int) -> None:
    """Raise _Corrupt unless the gzip members from `offset` to the end of the file are all complete.

    fastwarc stops without an error at a cut-short gzip member, so the end of the file is checked here.
    """
    with open(path, "rb") as handle:
        handle.seek(offset)
        decompressor = zlib.decompressobj(31)
        in_member = False
        while data := handle.read(_TAIL_CHUNK):
            while data:
                in_member = True
                decompressor.decompress(data)
                data = b""
                if decompressor.eof:
                    data, decompressor, in_member = decompressor.unused_data, zlib.decompressobj(31), False
        if in_member:
            raise _Corrupt(f"the file ends inside a gzip member, at byte {handle.tell()}")


def _check_warc_tail(path: Path, offset: int) -> None:
    """Raise _Corrupt unless the uncompressed WARC record at `offset` is whole and nothing but line ends follows it.

    fastwarc stops without an error at a cut-short record header, so the end of the file is checked here.
    """
    with open(path, "rb") as handle:
        handle.seek(offset)
        head = handle.read(_TAIL_CHUNK)
        if offset == 0 and not head:
            return
        end = head.find(b"\r\n\r\n")
        length = re.search(rb"^content-length:[ \t]*(\d+)", head[:max(end, 0)], re.IGNORECASE | re.MULTILINE)
        if length is None:
            raise _Corrupt(f"the WARC record header at byte {offset} is cut short or broken")
        record_end = offset + end + 4 + int(length[1])
        handle.seek(record_end)
        if handle.read(_TAIL_CHUNK).strip(b"\r\n"):
            raise _Corrupt(f"data after the last readable WARC record, from byte {record_end}")


def _html_str(payload: bytes, charset: str | None) -> str:
    """The page's text in its declared charset, or the detected one where the server named none or a bogus one."""
    try:
        codecs.lookup(charset or "")
    except LookupError:
        charset = detect_encoding(payload)
    return bytes_to_str(payload, charset)


def _read_web(path: Path, html: bool) -> Iterator[Document | Skip]:
    source = str(path)
    wanted = WarcRecordType.response if html else WarcRecordType.conversion
    last_offset = 0
    with open(path, "rb") as handle:
        compressed = handle.read(2) == _GZIP_MAGIC
        handle.seek(0)
        for number, record in enumerate(ArchiveIterator(handle, parse_http=html), start=1):
            last_offset = record.stream_pos
            uri = record.headers.get("WARC-Target-URI", "")
            name = f"record {number} <{uri}>" if uri else f"record {number}"
            is_wanted = record.record_type == wanted and (
                not html or (record.is_http and (record.http_content_type or "").lower() in _HTML_TYPES))
            payload = record.reader.read() if is_wanted else b""
            length = len(payload) + (0 if is_wanted else record.reader.consume())
            if "Content-Length" not in record.headers:  # fastwarc reads a header cut short as a record of 0 bytes
                raise _Corrupt(f"{name} has a cut-short or broken header (no Content-Length)")
            if length < record.content_length:
                raise _Corrupt(f"{name} ends after {length} of its {record.content_length} bytes")
            if not is_wanted:
                continue
            if html:
                text = extract_plain_text(_html_str(payload, record.http_charset), main_content=True)
            else:
                text = payload.decode("utf-8", errors="replace")
            yield Document(text, source, name) if text.strip() else Skip(source, name, "no text")
    if compressed:
        _check_gzip_tail(path, last_offset)
    else:
        _check_warc_tail(path, last_offset)
