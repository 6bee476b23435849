"""The streaming document readers: clean text in order from every format, one Skip per bad input, bounded memory."""

from __future__ import annotations

import gzip
import random
import tracemalloc
from pathlib import Path

import pytest
from corpus_fixtures import (
    WIKITEXT,
    WIKITEXT_PLAIN,
    truncate,
    write_jsonl,
    write_mediawiki,
    write_parquet,
    write_warc_html,
    write_wet,
)

from sparkgpt.data.readers import FORMATS, Document, Skip, detect_format, read_documents
from sparkgpt.errors import SparkGPTError

WORDS = ["alpha", "beta", "gamma", "delta", "raven", "crow", "rook", "jackdaw", "magpie", "jay"]


def prose(seed: int, words: int = 300) -> str:
    """Varied text that compresses like prose (so that compressed fixtures have many blocks and members)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(words))


def texts(items: list[Document | Skip]) -> list[str]:
    return [item.text for item in items if isinstance(item, Document)]


def skips(items: list[Document | Skip]) -> list[Skip]:
    return [item for item in items if isinstance(item, Skip)]


# ---- detect_format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("a.jsonl", "jsonl"), ("a.NDJSON", "jsonl"), ("a.jsonl.gz", "jsonl"), ("a.jsonl.zst", "jsonl"),
    ("a.ndjson.zstd", "jsonl"), ("a.parquet", "parquet"), ("enwiki-pages-articles.xml.bz2", "mediawiki"),
    ("a.xml", "mediawiki"), ("a.XML.GZ", "mediawiki"), ("CC-MAIN-1.warc.wet.gz", "wet"), ("a.wet", "wet"),
    ("a.wet.gz", "wet"), ("a.warc.wet", "wet"), ("a.warc", "warc"), ("a.warc.gz", "warc"), ("a.txt", "text"),
    ("README.md", "text"), ("a.rst", "text"), ("a.text", "text"), ("LICENSE", "text"),
])
def test_detect_format_by_name(tmp_path: Path, name: str, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00\x01binary-looking content that the name alone decides")
    assert detect_format(path) == expected


def test_detect_format_sniffs_unknown_suffixes(tmp_path: Path) -> None:
    (tmp_path / "notes.cfg").write_text("plain text\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "archive.gz").write_bytes(gzip.compress(b"hello"))
    assert detect_format(tmp_path / "notes.cfg") == "text"
    assert detect_format(tmp_path / "image.png") is None
    assert detect_format(tmp_path / "archive.gz") is None


def test_unknown_binary_file_is_one_skip(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    items = list(read_documents(path))
    assert len(items) == 1 and isinstance(items[0], Skip)
    assert items[0].source == str(path) and items[0].record == ""
    assert items[0].reason.startswith("unknown format (expected one of: text, jsonl, parquet")
    assert items[0].reason.endswith("choose one with --format)")


def test_explicit_unknown_format_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x")
    with pytest.raises(SparkGPTError, match="format 'csv': expected one of text, jsonl"):
        read_documents(path, "csv")  # at the call, before any file is read
    assert set(FORMATS) == {"text", "jsonl", "parquet", "mediawiki", "wet", "warc"}


def test_unreadable_file_is_one_skip(tmp_path: Path) -> None:
    items = list(read_documents(tmp_path / "missing.jsonl"))
    assert items == [Skip(str(tmp_path / "missing.jsonl"), "", "cannot read (No such file or directory)")]


# ---- text ----------------------------------------------------------------------------------------------------


def test_text_file_is_one_document_kept_exactly(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"  First line\n\nSecond line without newline at end ")
    assert list(read_documents(path)) == [Document(path.read_text(), str(path), "")]


def test_text_file_in_latin1(tmp_path: Path) -> None:
    path = tmp_path / "input.txt"
    path.write_bytes("Caf\u00e9 au lait\n".encode("latin-1"))
    assert texts(list(read_documents(path, encoding="latin-1"))) == ["Caf\u00e9 au lait\n"]


def test_long_text_file_splits_at_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    lines = [f"line {i} {'x' * (i % 7)}\n" for i in range(100)]
    path.write_text("".join(lines))
    items = list(read_documents(path, max_document_chars=200))
    assert all(isinstance(item, Document) and len(item.text) <= 200 for item in items)
    assert [item.record for item in items] == [f"part {i}" for i in range(1, len(items) + 1)]
    assert "".join(texts(items)) == "".join(lines)
    assert all(text.endswith("\n") for text in texts(items))


def test_non_utf8_text_file_is_skipped_naming_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"fine\ncaf\xe9\n")
    assert list(read_documents(path)) == [Skip(
        str(path), "line 2", "not UTF-8 text (byte 0xe9 at column 4); convert the file to UTF-8 or leave it out")]


def test_non_utf8_long_text_file_is_skipped_whole_before_any_part(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"good line\n" * 100 + b"caf\xe9\n")
    assert list(read_documents(path, max_document_chars=50)) == [Skip(
        str(path), "line 101", "not UTF-8 text (byte 0xe9 at column 4); convert the file to UTF-8 or leave it out")]


# ---- JSONL ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.ndjson.zstd"])
def test_jsonl_documents_in_order_compressed_or_not(tmp_path: Path, name: str) -> None:
    records = [{"text": prose(i, 50), "id": i} for i in range(20)]
    path = write_jsonl(tmp_path / name, records)
    items = list(read_documents(path))
    assert items == [Document(record["text"], str(path), f"line {i}") for i, record in enumerate(records, start=1)]


def test_jsonl_bad_lines_are_skipped_and_the_rest_read(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"text": "one"}, "", "{not json", {"content": "x"}, {"text": None}, [1, 2], {"text": "   "}, {"text": "two"},
    ])
    with open(path, "ab") as out:
        out.write(b'{"text": "caf\xe9"}\n' + b'{"text": "three"}\n')
    items = list(read_documents(path))
    assert texts(items) == ["one", "two", "three"]
    assert [(skip.record, skip.reason) for skip in skips(items)] == [
        ("line 3", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        ("line 4", "no string field 'text' (fields: content); choose one with --text-field"),
        ("line 5", "no string field 'text' (it is a JSON null); choose one with --text-field"),
        ("line 6", "no string field 'text' (the line is a JSON array, not an object); choose one with --text-field"),
        ("line 7", "no text"),
        ("line 9", "not UTF-8 text (byte 0xe9 at column 14); convert the file to UTF-8 or leave it out"),
    ]
    assert [item.record for item in items if isinstance(item, Document)] == ["line 1", "line 8", "line 10"]


def test_jsonl_text_field_option(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "hello"}])
    assert texts(list(read_documents(path, text_field="content"))) == ["hello"]


@pytest.mark.parametrize("name", ["a.jsonl.zst", "a.jsonl.gz"])
def test_truncated_compressed_jsonl_yields_documents_then_one_skip(tmp_path: Path, name: str) -> None:
    records = [{"text": prose(i)} for i in range(200)]
    path = truncate(write_jsonl(tmp_path / name, records), 0.5)
    items = list(read_documents(path))
    documents, (skip,) = items[:-1], items[-1:]
    assert documents and all(isinstance(item, Document) for item in documents)
    assert texts(documents) == [record["text"] for record in records[:len(documents)]]
    assert skip.record == f"after line {len(documents)}"
    assert skip.reason.startswith("truncated or corrupt archive (") and "ended before the end" in skip.reason


# ---- Parquet -------------------------------------------------------------------------------------------------


def test_parquet_rows_in_order_with_null_rows_skipped(tmp_path: Path) -> None:
    values = [f"row text {i}" for i in range(600)]
    values[3] = None
    values[450] = ""
    path = write_parquet(tmp_path / "a.parquet", values, row_group_size=100, id=list(range(600)))
    items = list(read_documents(path))
    assert len(items) == 600
    assert skips(items) == [Skip(str(path), "row 4", "no text"), Skip(str(path), "row 451", "no text")]
    assert items[0] == Document("row text 0", str(path), "row 1")
    assert texts(items) == [value for value in values if value]


def test_parquet_missing_column_is_one_skip_naming_the_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", ["x"], field="content", id=[1])
    assert list(read_documents(path)) == [
        Skip(str(path), "", "no column 'text' (columns: content, id); choose one with --text-field")]


def test_corrupt_parquet_is_one_skip(tmp_path: Path) -> None:
    path = truncate(write_parquet(tmp_path / "a.parquet", ["x" * 1000] * 10), 0.5)
    (skip,) = list(read_documents(path))
    assert skip.record == "" and skip.reason.startswith("truncated or corrupt archive (")


# ---- MediaWiki -----------------------------------------------------------------------------------------------


def test_mediawiki_article_becomes_plain_text(tmp_path: Path) -> None:
    path = write_mediawiki(tmp_path / "wiki.xml.bz2", [("Common raven", WIKITEXT), ("Jay", "A '''jay''' is a bird.")],
                           redirects=[("Raven", "Common raven")], other_namespaces=[(1, "Talk:Jay", "Talk text")])
    items = list(read_documents(path))
    assert items == [Document(WIKITEXT_PLAIN, str(path), "page 'Common raven'"),
                     Document("A jay is a bird.", str(path), "page 'Jay'")]
    for marker in ("{{", "[[", "Category:", "<ref", "'''", "==", "wikitable", "thumb", "<!--"):
        assert marker not in items[0].text


def test_mediawiki_page_without_text_is_skipped(tmp_path: Path) -> None:
    path = write_mediawiki(tmp_path / "wiki.xml", [("Stub", "{{stub}}\n[[Category:Stubs]]"), ("Jay", "Jays.")])
    assert list(read_documents(path)) == [Skip(str(path), "page 'Stub'", "no text"),
                                          Document("Jays.", str(path), "page 'Jay'")]


def test_truncated_mediawiki_bz2_yields_pages_then_one_skip(tmp_path: Path) -> None:
    pages = [(f"Page {i}", prose(i, 500)) for i in range(120)]
    path = truncate(write_mediawiki(tmp_path / "wiki.xml.bz2", pages), 0.7)
    items = list(read_documents(path))
    documents, skip = items[:-1], items[-1]
    assert documents and texts(documents) == [text for _, text in pages[:len(documents)]]
    assert skip == Skip(str(path), f"after page 'Page {len(documents) - 1}'",
                        "truncated or corrupt archive (Compressed file ended before the end-of-stream marker was "
                        "reached)")


# ---- WET and WARC --------------------------------------------------------------------------------------------


def test_wet_records_with_their_uris(tmp_path: Path) -> None:
    records = [(f"http://example.com/{i}", prose(i, 40)) for i in range(5)]
    records.append(("http://example.com/e", "\u00e9t\u00e9!"))
    path = write_wet(tmp_path / "a.warc.wet.gz", records)
    items = list(read_documents(path))
    assert items == [Document(text, str(path), f"record {i} <{uri}>")
                     for i, (uri, text) in enumerate(records, start=2)]  # record 1 is the warcinfo


@pytest.mark.parametrize("name", ["a.warc.wet.gz", "a.warc.wet"])
def test_truncated_wet_yields_records_then_one_skip(tmp_path: Path, name: str) -> None:
    records = [(f"http://example.com/{i}", prose(i)) for i in range(100)]
    full = write_wet(tmp_path / name, records).read_bytes()
    if name.endswith(".gz"):
        cuts = [len(full) // 2, len(full) - 10, len(full) - 1]
    else:  # cuts within a record's header, and within the last record (but not its closing blank line: harmless)
        header = full.index(b"WARC/1.0", len(full) // 2)
        cuts = [len(full) // 2, header + 5, header + 150, header + 350, len(full) - 10]
    for keep in cuts:
        path = tmp_path / name
        path.write_bytes(full[:keep])
        items = list(read_documents(path))
        documents, skip = items[:-1], items[-1]
        assert texts(documents) == [text for _, text in records[:len(documents)]], keep
        assert isinstance(skip, Skip) and skip.reason.startswith("truncated or corrupt archive ("), (keep, skip)
        assert skip.record == f"after record {len(documents) + 1} <http://example.com/{len(documents) - 1}>"


def test_corrupt_wet_yields_records_then_one_skip(tmp_path: Path) -> None:
    records = [(f"http://example.com/{i}", prose(i)) for i in range(100)]
    data = write_wet(tmp_path / "a.warc.wet.gz", records).read_bytes()
    middle = len(data) // 2
    (tmp_path / "a.warc.wet.gz").write_bytes(data[:middle] + b"\0" * 200 + data[middle + 200:])
    items = list(read_documents(tmp_path / "a.warc.wet.gz"))
    assert 0 < len(texts(items)) < 100 and items[-1].reason.startswith("truncated or corrupt archive (")
    assert len(skips(items)) == 1


HTML = """<!doctype html><html><head><title>Ravens</title><script>var tracking = 1;</script></head><body>
<nav><a href="/">Home</a> <a href="/about">About us</a> <a href="/shop">Shop</a></nav>
<article><h1>The common raven</h1><p>{body}</p><p>Ravens live in many habitats across the north.</p></article>
<footer>Copyright 2024 Example Corp. All rights reserved. Privacy policy.</footer></body></html>"""


@pytest.mark.parametrize("name", ["a.warc.gz", "a.warc"])
def test_warc_html_main_text_extracted(tmp_path: Path, name: str) -> None:
    body = "The common raven is a large all-black passerine bird found across the northern hemisphere. " * 5
    path = write_warc_html(tmp_path / name, [("http://example.com/raven", HTML.format(body=body)),
                                             ("http://example.com/empty", "<html><body></body></html>")],
                           extra=[("http://example.com/logo.png", "image/png", b"\x89PNG\r\n\x1a\n")])
    items = list(read_documents(path))
    assert len(items) == 2
    document, skip = items
    assert document.record == "record 2 <http://example.com/raven>"
    assert body.strip()[:80] in document.text and "Ravens live in many habitats" in document.text
    for boilerplate in ("tracking", "<p>", "About us", "Copyright", "Privacy policy"):
        assert boilerplate not in document.text
    assert skip == Skip(str(path), "record 3 <http://example.com/empty>", "no text")


# ---- streaming -----------------------------------------------------------------------------------------------


def first_document_and_peak_memory(path: Path) -> tuple[Document | Skip, int]:
    """The first item read from `path` and the peak of Python allocations while reading it."""
    tracemalloc.start()
    try:
        documents = read_documents(path)
        first = next(documents)
        _, peak = tracemalloc.get_traced_memory()
        documents.close()
    finally:
        tracemalloc.stop()
    return first, peak


def test_first_jsonl_zst_document_comes_before_the_file_is_read(tmp_path: Path) -> None:
    rng = random.Random(0)
    bodies = [f"document {i} {rng.randbytes(400).hex()}" for i in range(15_000)]  # hex: compresses only 2x
    path = write_jsonl(tmp_path / "big.jsonl.zst", ({"text": body} for body in bodies))
    first, peak = first_document_and_peak_memory(path)
    assert first == Document(bodies[0], str(path), "line 1")
    assert peak < 4 << 20 < path.stat().st_size / 1.5  # a few read buffers of a megabyte, whatever the file size


def test_first_wet_record_comes_before_the_file_is_read(tmp_path: Path) -> None:
    path = write_wet(tmp_path / "big.warc.wet.gz", [(f"http://example.com/{i}", prose(i, 300)) for i in range(3000)])
    size = path.stat().st_size
    first, peak = first_document_and_peak_memory(path)
    assert first.text == prose(0, 300)
    assert peak < size // 4
