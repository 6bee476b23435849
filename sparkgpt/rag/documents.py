"""Documents in, chunks out: the readers for each file type and the splitter that cuts text into chunks.

A chunk keeps where it came from (the file, or `file.jsonl#id` for a JSONL record, and its character span), so an
answer can cite it and a reader can open the place. Chunks are counted in the embedder's tokens, cut at sentence
ends where one falls in the second half of the window, and overlap their neighbours by a few tokens so a fact
split across a boundary is whole in one of them.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sparkgpt.errors import SparkGPTError
from sparkgpt.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
SUFFIXES = (*TEXT_SUFFIXES, *HTML_SUFFIXES, ".pdf", ".jsonl")
JSONL_TEXT_FIELDS = ("text", "content", "body")


@dataclass(frozen=True)
class Document:
    """One text to index: `source` names it in citations (a path, or `path#id` for a JSONL record)."""

    source: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class Chunk:
    source: str
    start: int  # character span of `text` within its document
    end: int
    text: str
    title: str = ""


@dataclass
class Skipped:
    """Files that could not be read: (path, why), reported and counted, never fatal."""

    files: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path, why: str) -> None:
        self.files.append((str(path), why))


def find_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files to index: each file given, and every supported file under each folder (hidden ones left out),
    sorted so that every run sees them in the same order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            raise SparkGPTError(f"{path}: no such file or folder")
    return list(dict.fromkeys(found))


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_documents(path: Path, source: str) -> list[Document]:
    """The documents of one file, by its suffix (unknown suffixes are read as UTF-8 text). Raises ValueError or
    OSError with the reason when the file cannot be read."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return [_read_pdf(path, source)]
    if suffix == ".jsonl":
        return list(_read_jsonl(path, source))
    text = path.read_bytes().decode("utf-8")
    if suffix in HTML_SUFFIXES:
        title, body = html_to_text(text)
        return [Document(source, body, title)]
    return [Document(source, text, _markdown_title(text) if suffix in (".md", ".markdown") else "")]


def html_to_text(markup: str) -> tuple[str, str]:
    """(title, visible text) of an HTML page: scripts, styles and other non-content elements dropped, block
    elements on lines of their own."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts))
    text = re.sub(r"\n\s*\n\s*", "\n\n", re.sub(r" *\n *", "\n", text)).strip()
    return " ".join("".join(parser.title).split()), text


class _TextExtractor(html.parser.HTMLParser):
    HIDDEN = frozenset({"script", "style", "noscript", "template", "svg", "head", "nav", "iframe", "object"})
    BLOCKS = frozenset({"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
                        "section", "article", "header", "footer", "blockquote", "pre", "dt", "dd", "hr", "main",
                        "aside", "figcaption"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self.hidden_depth = 0
        self.in_title = False

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "title":
            self.in_title = True
        elif tag in self.HIDDEN:
            self.hidden_depth += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6") else "\n")
        elif tag in ("td", "th"):
            self.parts.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        elif tag in self.HIDDEN:
            self.hidden_depth = max(0, self.hidden_depth - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif not self.hidden_depth:
            self.parts.append(data)


def _markdown_title(text: str) -> str:
    match = re.search(r"^#\s+(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else ""


def _read_pdf(path: Path, source: str) -> Document:
    import pypdf  # loaded only when a PDF is indexed

    try:
        reader = pypdf.PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except pypdf.errors.PyPdfError as error:
        raise ValueError(f"not a readable PDF ({error})") from None
    return Document(source, "\n\n".join(page.strip() for page in pages), str(title))


def _read_jsonl(path: Path, source: str) -> Iterator[Document]:
    """One document per line: its text in "text" (or "content", "body"), cited as `path#id` (the "id" field, else
    the line number), with an optional "title"."""
    for number, line in enumerate(path.read_bytes().decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"line {number}: not valid JSON ({error.msg})") from None
        text = next((record[name] for name in JSONL_TEXT_FIELDS if isinstance(record, dict)
                     and isinstance(record.get(name), str)), None)
        if text is None:
            raise ValueError(f"line {number}: expected an object with a text field ({', '.join(JSONL_TEXT_FIELDS)})")
        title = record.get("title") if isinstance(record.get("title"), str) else ""
        yield Document(f"{source}#{record.get('id', number)}", text, title)


_SENTENCE_END = re.compile(r"[.!?。！？][\"')\]]*\s+|\n\s*\n")


def split_into_chunks(document: Document, tokenizer: Tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Windows of at most `chunk_tokens` tokens, each ending at the last sentence end in its second half (else at
    the window's end), the next starting `overlap` tokens earlier (at a sentence start where one is that close)."""
    if chunk_tokens < 8:
        raise SparkGPTError(f"chunk size must be at least 8 tokens, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens // 2:
        raise SparkGPTError(f"overlap must be between 0 and half the chunk size ({chunk_tokens // 2}), got {overlap}")
    text = document.text
    _, offsets = tokenizer.encode_with_offsets(text)
    spans = [(s, e) for s, e in offsets if e > s]
    if not spans:
        return []
    sentence_starts = {match.end() for match in _SENTENCE_END.finditer(text)}
    begins = [i == 0 or s in sentence_starts for i, (s, _) in enumerate(spans)]
    chunks, start = [], 0
    while True:
        end = min(start + chunk_tokens, len(spans))
        if end < len(spans):
            end = next((b for b in range(end, start + chunk_tokens // 2, -1) if begins[b]), end)
        chunks.append(_chunk(document, spans[start][0], spans[end - 1][1]))
        if end == len(spans):
            return chunks
        start = next((b for b in range(end - overlap, end) if begins[b]), end - overlap)


def _chunk(document: Document, start: int, end: int) -> Chunk:
    return Chunk(document.source, start, end, document.text[start:end], document.title)
