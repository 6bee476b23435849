"""Small pretraining-corpus files written from given texts, for tests of the document readers and the pipeline.

Each writer produces the real on-disk format (MediaWiki export XML, WET/WARC via warcio, Parquet, JSONL), compressed
by the file name's suffix, so that tests read exactly what a downloaded dump would contain.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import escape, quoteattr

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

MEDIAWIKI_HEADER = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:schemaLocation="http://www.mediawiki.org/xml/export-0.10/ http://www.mediawiki.org/xml/export-0.10.xsd" \
version="0.10" xml:lang="en">
  <siteinfo>
    <sitename>Wikipedia</sitename>
    <dbname>testwiki</dbname>
    <base>https://en.wikipedia.org/wiki/Main_Page</base>
    <generator>MediaWiki 1.41.0</generator>
    <case>first-letter</case>
    <namespaces>
      <namespace key="-1" case="first-letter">Special</namespace>
      <namespace key="0" case="first-letter" />
      <namespace key="1" case="first-letter">Talk</namespace>
      <namespace key="6" case="first-letter">File</namespace>
      <namespace key="10" case="first-letter">Template</namespace>
      <namespace key="14" case="first-letter">Category</namespace>
    </namespaces>
  </siteinfo>
"""

# A realistic article: infobox, templates, references (inline and named), labelled links, a File: link whose caption
# holds a link, categories, a table, bold/italic, headings and a comment.
WIKITEXT = """{{Short description|Species of bird}}
{{Infobox bird
| name = Common raven
| image = Corvus corax.jpg
| status = LC
}}
The '''common raven''' (''Corvus corax'') is a large all-black [[passerine]] bird.<ref>{{cite book |title=Birds \
|year=2001}}</ref> It is found across the [[Northern Hemisphere|northern hemisphere]].<ref name="iucn" />
<!-- Do not change the lead without discussion. -->

[[File:Corvus corax (FWS).jpg|thumb|A raven in [[Alaska]]]]


== Description ==
A mature raven is about {{convert|63|cm|in|abbr=on}} long.

{| class="wikitable"
! Measure !! Value
|-
| Length || 63 cm
|}

=== Voice ===
Ravens make a ''wide'' range of calls.<ref name="calls">Boarman 1999.</ref>

[[Category:Corvus]]
[[Category:Birds of North America]]
"""

WIKITEXT_PLAIN = """The common raven (Corvus corax) is a large all-black passerine bird. It is found across the \
northern hemisphere.

Description
A mature raven is about long.

Voice
Ravens make a wide range of calls."""


def _open_compressed(path: Path) -> IO[bytes]:
    """A binary writer that compresses by the name's last suffix (.gz, .bz2, .zst/.zstd) or writes plain bytes."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "wb")
    if suffix == ".bz2":
        return bz2.open(path, "wb", compresslevel=1)  # 100 kB blocks, so a cut-short test file still has whole blocks
    if suffix in (".zst", ".zstd"):
        return zstandard.ZstdCompressor().stream_writer(open(path, "wb"), closefd=True)
    return open(path, "wb")


def write_mediawiki(path: Path, pages: Sequence[tuple[str, str]], redirects: Sequence[tuple[str, str]] = (),
                    other_namespaces: Sequence[tuple[int, str, str]] = ()) -> Path:
    """A MediaWiki export of `pages` (title, wikitext), `redirects` (title, target) and (ns, title, text) pages."""
    entries: list[tuple[int, str, str, str | None]] = [(0, title, text, None) for title, text in pages]
    entries += [(0, title, f"#REDIRECT [[{target}]]", target) for title, target in redirects]
    entries += [(ns, title, text, None) for ns, title, text in other_namespaces]
    parts = [MEDIAWIKI_HEADER]
    for page_id, (ns, title, text, target) in enumerate(entries, start=1):
        redirect = f"    <redirect title={quoteattr(target)} />\n" if target is not None else ""
        parts.append(
            f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n    <id>{page_id}</id>\n{redirect}"
            f"    <revision>\n      <id>{1000 + page_id}</id>\n      <timestamp>2024-01-01T00:00:00Z</timestamp>\n"
            f"      <contributor>\n        <username>Tester</username>\n        <id>1</id>\n      </contributor>\n"
            f"      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
            f"      <text bytes=\"{len(text.encode())}\" xml:space=\"preserve\">{escape(text)}</text>\n"
            f"      <sha1>0</sha1>\n    </revision>\n  </page>\n"
        )
    parts.append("</mediawiki>\n")
    with _open_compressed(path) as out:
        out.write("".join(parts).encode("utf-8"))
    return path


def write_wet(path: Path, records: Sequence[tuple[str, str]]) -> Path:
    """A WET file (gzipped, as Common Crawl publishes, if the name ends in .gz): a warcinfo record, then a conversion
    record per (uri, text)."""
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=path.suffix.lower() == ".gz")
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "sparkgpt-tests"}))
        for uri, text in records:
            writer.write_record(writer.create_warc_record(
                uri, "conversion", payload=io.BytesIO(text.encode("utf-8")), warc_content_type="text/plain"))
    return path


def write_warc_html(path: Path, pages: Sequence[tuple[str, str]], content_type: str = "text/html; charset=utf-8",
                    extra: Sequence[tuple[str, str, bytes]] = ()) -> Path:
    """A WARC (gzipped if the name ends in .gz) of HTTP responses: (uri, html) pages, then (uri, type, body) extras."""
    responses = [(uri, content_type, html.encode("utf-8")) for uri, html in pages] + list(extra)
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=path.suffix.lower() == ".gz")
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "sparkgpt-tests"}))
        for uri, kind, body in responses:
            headers = StatusAndHeaders("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body)))],
                                       protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(uri, "response", payload=io.BytesIO(body),
                                                          http_headers=headers))
    return path


def write_parquet(path: Path, texts: Sequence[str | None], field: str = "text", row_group_size: int | None = None,
                  **other_columns: Sequence[Any]) -> Path:
    """A Parquet file with a string column `field` (None for a null) and any other columns given."""
    table = pa.table({field: pa.array(list(texts), type=pa.string()), **{k: list(v) for k, v in other_columns.items()}})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, records: Iterable[Any | str]) -> Path:
    """JSONL, compressed by suffix (.gz, .zst/.zstd); a str record is written as the raw line (to make bad lines)."""
    with _open_compressed(path) as out:
        for record in records:
            line = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
            out.write(line.encode("utf-8") + b"\n")
    return path


def truncate(path: Path, keep: float | int) -> Path:
    """Cut the file short: keep a fraction (float) or a number of bytes (int) of it, as an interrupted download does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    return path
