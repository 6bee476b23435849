"""The cleaning stage of a web-scale pretraining pipeline: quality rules, language filter and deduplication keys.

Web crawls are mostly boilerplate, spam and copies; FineWeb (datatrove) showed that a handful of cheap heuristics
plus MinHash deduplication is what turns a crawl into useful pretraining text. This module implements the same
rules with the same definitions and defaults as datatrove's `GopherRepetitionFilter`, `GopherQualityFilter` and
`C4QualityFilter` (applied in FineWeb's order), without datatrove: one word split is shared by all rules and the
repeated-n-gram scans take fast paths, because this stage sees every document of the crawl.

Tokenisation (documented so that results are reproducible without NLTK or spaCy models):
- words: `split_words`, runs of word characters or runs of other non-space characters (`\\w+|[^\\w\\s]+`), so
  punctuation is split off words as NLTK/spaCy do and "symbol words" stay meaningful;
- sentences: `count_sentences`, runs of `.!?…。！？` followed (after closing quotes/brackets) by space or the end;
- MinHash words: FineWeb's `simplify_text` normalisation (lower case, numbers to 0, punctuation to spaces, collapsed
  whitespace, diacritics removed), then split on whitespace.

Deduplication is split so a pipeline can stream: `document_hash` (exact) and `MinHasher.band_hashes` (near) are per
document; `near_duplicates` then clusters the [docs, bands] band-hash matrix (possibly memmapped) in O(docs) memory.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import accumulate, filterfalse
from operator import add, sub

import numpy as np
import xxhash

from sparkgpt.errors import SparkGPTError

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
QUALITY_MODES = ("auto", "on", "off")

# datatrove's PUNCTUATION (simplify_text turns these into spaces) plus its TERMINAL_PUNCTUATION set (Gopher's
# "symbol words" are tokens made only of characters from the union); kept byte-identical for parity.
_PUNCTUATION = "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»" + "".join(
    chr(x) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b)
)
_TERMINAL_PUNCTUATION = (
    "᪩？⁈𑩂．꩞𑅃﹗𑂾\u1b7d፧𑅂꡶꘎⁉࠾᪨𑊩𑱂᱿𖩮᥅\U00011f43\U00011f44﹒𑈹𑈸።܂؞꛳\U00010f88𑗍𐩖𑙂\u061d꩟᠉\u1b7e𑗗᰼𑻸؟𑪜꧉𑗉𐽙𖫵𖬷܀꓿᜵𑗏𑁇𑗓𑥄"
    "៖𑥆𑗑𑗒꯫۔𐩗\U00010f86꡷\u2e54｡៕߹⸮.𑇅࠹𛲟꫰꤯𐽗᭞𑜼፨𑃁꣏𑇟𖬸𑪛𑜾࠷𝪈?𑃀𑗃！։꣎॥𑗖᭛᠃!၊𖺘⁇𑗌𑑋𖭄᭟𑅁𑙁⸼꩝𑗋。꧈꫱𑜽𐽖𑂿᙮។꛷"
    "\U00010f89៚᥄𑗕𑗎᪪᭚࠽𑇞𑗊𐽘\u2e53𑗔𖩯𑇍𑻷𐽕𑩃।𑗂𑇆𑁈။᱾𑱁꘏܁᜶‼𑈻‽᪫﹖𑑌𑈼\U00010f87𑗐៙᰻"
)
_SYMBOLS = frozenset(_PUNCTUATION) | frozenset(_TERMINAL_PUNCTUATION)
# One pass turns punctuation into spaces and collapses the runs, as simplify_text's translate + \s+ substitution do.
_PUNCTUATION_OR_SPACE = re.compile("[\\s" + "".join(map(re.escape, _PUNCTUATION)) + "]+")

_WORD = re.compile(r"\w+|[^\w\s]+")
_SENTENCE_END = re.compile(r"[.!?…。！？]+[\"'”’)\]]*(?=\s|$)")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAK = re.compile(r"\n+")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
# Python's \d is exactly Unicode category Nd, so this equals datatrove's \p{Nd} pattern without the `regex` package.
_NUMBER = re.compile(r"\d+(?:[.,،٫⎖⎗⎘]\d+)?")
_WHITESPACE = re.compile(r"\s+")
_C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
_C4_POLICY = re.compile("terms of use|privacy policy|cookie policy|uses cookies|use of cookies|use cookies")

_MERSENNE_61 = np.uint64((1 << 61) - 1)
_SHINGLES_PER_BLOCK = 512  # 512 shingles x 112 hashes x 8 bytes x 2 buffers: under 1 MB of scratch
_CHARS_PER_CHUNK = 1 << 15  # long documents are normalised in 32K-character pieces, cut at whitespace


@dataclass(frozen=True)
class CleanConfig:
    """What the cleaning stage keeps. Thresholds default to datatrove's; 0 turns a numeric rule off, as there."""

    quality: str = "auto"  # "auto": the quality rules on web formats only (wet/warc), "on", "off"
    languages: tuple[str, ...] = ()  # ISO 639-1 codes to keep; () = no language filter
    language_threshold: float = 0.65
    exact_dedup: bool = True
    near_dedup: bool = True
    ngram: int = 5  # words per shingle (FineWeb's MinHash settings)
    bands: int = 14
    rows: int = 8  # hashes per band; bands*rows hashes in all
    seed: int = 1
    # Gopher quality (datatrove GopherQualityFilter)
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8  # (datatrove's name) the minimum share of words with a letter
    min_stop_words: int = 2
    stop_words: tuple[str, ...] = STOP_WORDS
    # Gopher repetition (datatrove GopherRepetitionFilter)
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    # C4 quality (datatrove C4QualityFilter, split on lines as in the paper)
    c4_min_sentences: int = 5
    c4_min_words_per_line: int = 3
    c4_max_word_length: int = 1000
    c4_remove_citations: bool = True
    c4_filter_no_terminal_punct: bool = True
    c4_filter_lorem_ipsum: bool = True
    c4_filter_javascript: bool = True
    c4_filter_curly_bracket: bool = True
    c4_filter_policy: bool = True

    def __post_init__(self) -> None:
        if self.quality not in QUALITY_MODES:
            modes = ", ".join(QUALITY_MODES)
            raise SparkGPTError(f"clean config: quality must be one of {modes}, got {self.quality!r}")
        for name in ("ngram", "bands", "rows"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("seed", "min_doc_words", "max_doc_words", "min_stop_words", "c4_min_sentences",
                     "c4_min_words_per_line", "c4_max_word_length"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.seed >= 2**32:
            raise SparkGPTError(f"clean config: seed must be below 2**32, got {self.seed}")
        for name in ("language_threshold", "max_symbol_word_ratio", "max_bullet_lines_ratio",
                     "max_ellipsis_lines_ratio", "max_non_alpha_words_ratio", "dup_line_frac", "dup_para_frac",
                     "dup_line_char_frac", "dup_para_char_frac"):
            _check_fraction(name, getattr(self, name))
        for name in ("min_avg_word_length", "max_avg_word_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise SparkGPTError(f"clean config: {name} must be a number >= 0, got {value!r}")
        for name in ("top_n_grams", "dup_n_grams"):
            pairs = getattr(self, name)
            if not isinstance(pairs, (tuple, list)):
                raise SparkGPTError(f"clean config: {name} must be a list of (n, fraction) pairs, got {pairs!r}")
            pairs = tuple(tuple(pair) if isinstance(pair, (tuple, list)) else (pair,) for pair in pairs)
            for pair in pairs:
                if len(pair) != 2:
                    raise SparkGPTError(f"clean config: {name} must hold (n, fraction) pairs, got {pair!r}")
                _check_int(name, pair[0], minimum=1)
                _check_fraction(name, pair[1])
            object.__setattr__(self, name, pairs)
        for name in ("languages", "stop_words"):
            values = getattr(self, name)
            if not isinstance(values, (tuple, list)) or not all(isinstance(v, str) for v in values):
                raise SparkGPTError(f"clean config: {name} must be a list of strings, got {values!r}")
            object.__setattr__(self, name, tuple(values))
        if self.languages:
            unknown = sorted(set(self.languages) - set(_language_identifier().labels))
            if unknown:
                raise SparkGPTError(f"clean config: languages holds unknown ISO 639-1 codes: {', '.join(unknown)}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SparkGPTError(f"clean config: {name} must be an integer >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise SparkGPTError(f"clean config: {name} must be a number in [0, 1], got {value!r}")


def split_words(text: str) -> list[str]:
    """The words the quality rules count: runs of word characters, and runs of other non-space characters."""
    return _WORD.findall(text)


def count_sentences(line: str) -> int:
    """Sentences in a line: terminal punctuation runs followed by space or the end; a line is at least one."""
    return max(1, len(_SENTENCE_END.findall(line)))


def filter_document(text: str, config: CleanConfig, web: bool) -> tuple[str | None, str | None]:
    """(text kept — possibly with lines removed by the C4 line rules — or None, the name of the rule that removed it
    or None).

    Order as in FineWeb: language, Gopher repetition, Gopher quality, C4 quality. With `quality="auto"` the quality
    rules apply only to web documents (`web=True`), since curated sources fail rules tuned for crawled HTML.
    """
    if config.languages and not _language_ok(text, config):
        return None, "language"
    if config.quality == "off" or (config.quality == "auto" and not web):
        return text, None
    words = split_words(text)
    rule = _gopher_repetition(text, words, config) or _gopher_quality(text, words, config)
    if rule is not None:
        return None, rule
    return _c4_quality(text, config)


@lru_cache(maxsize=1)
def _language_identifier():  # py3langid is imported lazily: only a language filter needs its model
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _language_ok(text: str, config: CleanConfig) -> bool:
    language, score = _language_identifier().classify(text)
    return language in config.languages and score >= config.language_threshold


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated items, their characters), counting every occurrence after the first, as datatrove does."""
    counts = Counter(items)
    if len(counts) == len(items):
        return 0, 0
    return len(items) - len(counts), sum(len(item) * (n - 1) for item, n in counts.items() if n > 1)


def _gopher_repetition(text: str, words: list[str], config: CleanConfig) -> str | None:
    if not text:
        return "empty"
    paragraphs = _PARAGRAPH_BREAK.split(text.strip())
    repeated, chars = _duplicates(paragraphs)
    if config.dup_para_frac and repeated / len(paragraphs) > config.dup_para_frac:
        return "dup_para_frac"
    if config.dup_para_char_frac and chars / len(text) > config.dup_para_char_frac:
        return "dup_para_char_frac"
    lines = _LINE_BREAK.split(text)
    repeated, chars = _duplicates(lines)
    if config.dup_line_frac and repeated / len(lines) > config.dup_line_frac:
        return "dup_line_frac"
    if config.dup_line_char_frac and chars / len(text) > config.dup_line_char_frac:
        return "dup_line_char_frac"

    offsets = list(accumulate(map(len, words), initial=0))  # words[i:j] joined without spaces: offsets[j]-offsets[i]
    top_counts: dict[int, int] = {}  # n -> the highest n-gram count, which bounds the counts of longer n-grams
    for n, fraction in config.top_n_grams:
        if len(words) < n:
            continue
        bound = min((count for m, count in top_counts.items() if m < n), default=None)
        longest = max(map(sub, offsets[n:], offsets)) + n - 1
        if bound is not None and bound * longest / len(text) <= fraction:
            continue  # even the longest n-gram, repeated that often, would pass
        # Words hold no spaces, so datatrove's space-joined n-gram strings and word tuples are counted alike;
        # most_common(1) breaks ties by first occurrence in both, so the top n-gram is the same.
        top, count = Counter(zip(*(words[k:] for k in range(n)), strict=False)).most_common(1)[0]
        top_counts[n] = count
        if (sum(map(len, top)) + n - 1) * count / len(text) > fraction:
            return f"top_{n}_gram"

    joined = "".join(words)
    checks = [(n, fraction) for n, fraction in config.dup_n_grams if len(words) >= n]
    if checks and not _may_repeat(joined, offsets, min(n for n, _ in checks)):
        return None
    for n, fraction in checks:
        grams = [joined[offsets[i] : offsets[i + n]] for i in range(len(words) - n + 1)]
        if len(set(grams)) == len(grams):
            continue  # no gram repeats: nothing for the greedy scan to count
        if _repeated_gram_chars(grams, n) / len(text) > fraction:
            return f"duplicated_{n}_n_grams"
    return None


def _may_repeat(joined: str, offsets: list[int], n: int) -> bool:
    """False when no m-gram (m >= n) of the concatenated words occurs twice, settled with one sort of the n-grams.

    Two equal m-grams start with two n-grams of which the shorter is a prefix of the longer; sorted, a string sits
    right before one it prefixes, so checking neighbours finds every such pair.
    """
    grams = sorted([joined[offsets[i] : offsets[i + n]] for i in range(len(offsets) - n)])
    return any(map(str.startswith, grams[1:], grams))


def _repeated_gram_chars(grams: list[str], n: int) -> int:
    """Characters in repeated n-grams, scanning left to right and jumping past each repeat (Gopher's definition)."""
    seen: set[str] = set()
    repeated = i = 0
    while i < len(grams):
        gram = grams[i]
        if gram in seen:
            repeated += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


def _gopher_quality(text: str, words: list[str], config: CleanConfig) -> str | None:
    kept = list(filterfalse(_SYMBOLS.issuperset, words))  # datatrove's "non-symbol words"
    n_kept = len(kept)
    if (config.min_doc_words and n_kept < config.min_doc_words) or not words:
        return "gopher_short_document"
    if config.max_doc_words and n_kept > config.max_doc_words:
        return "gopher_long_document"
    mean_length = sum(map(len, kept)) / n_kept if n_kept else float("nan")
    if config.min_avg_word_length and mean_length < config.min_avg_word_length:
        return "gopher_below_avg_threshold"
    if config.max_avg_word_length and mean_length > config.max_avg_word_length:
        return "gopher_above_avg_threshold"
    n_words = len(words)
    if config.max_symbol_word_ratio and text.count("#") / n_words > config.max_symbol_word_ratio:
        return "gopher_too_many_hashes"
    if config.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > config.max_symbol_word_ratio:
        return "gopher_too_many_ellipsis"
    lines = text.splitlines()
    if config.max_bullet_lines_ratio:
        bullets = sum(line.lstrip().startswith(("•", "-")) for line in lines)
        if bullets / len(lines) > config.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
    if config.max_ellipsis_lines_ratio:
        ellipses = sum(line.rstrip().endswith(("...", "…")) for line in lines)
        if ellipses / len(lines) > config.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
    if config.max_non_alpha_words_ratio:
        # isalpha() settles most words in C; only the rest (numbers, symbols, mixed) need a per-character test.
        rest = list(filterfalse(str.isalpha, words))
        alpha = len(words) - len(rest) + sum(any(map(str.isalpha, w)) for w in rest)
        if alpha / n_words < config.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
    if config.min_stop_words and len(frozenset(config.stop_words).intersection(words)) < config.min_stop_words:
        return "gopher_enough_stop_words"
    return None


def _c4_quality(text: str, config: CleanConfig) -> tuple[str | None, str | None]:
    sentences = 0
    kept = []
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        limit = config.c4_max_word_length
        if limit and len(line) > limit and max(map(len, words)) > limit:
            continue
        if config.c4_remove_citations and "[" in line:
            line = _CITATION.sub("", line)
        if config.c4_filter_no_terminal_punct and (not line.endswith(_C4_END_PUNCTUATION) or line.endswith("...")):
            continue
        if len(words) < config.c4_min_words_per_line:
            continue
        lower = line.lower()
        if config.c4_filter_lorem_ipsum and "lorem ipsum" in lower:
            return None, "c4_lorem_ipsum"
        if config.c4_filter_javascript and "javascript" in lower:
            continue
        if config.c4_filter_curly_bracket and "{" in line:
            return None, "c4_curly_bracket"
        if config.c4_filter_policy and _C4_POLICY.search(lower):
            continue
        if config.c4_min_sentences:
            sentences += count_sentences(line)
        kept.append(line)
    if sentences < config.c4_min_sentences:
        return None, "c4_too_few_sentences"
    return "\n".join(kept).strip(), None


def document_hash(text: str) -> int:
    """The exact-deduplication key: xxh3_64 of the UTF-8 bytes."""
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


def simplify_text(text: str) -> str:
    """FineWeb's MinHash normalisation: lower case, numbers to "0", punctuation to spaces, one space, no diacritics."""
    text = _PUNCTUATION_OR_SPACE.sub(" ", _NUMBER.sub("0", text.lower())).strip()
    if not text.isascii():
        text = unicodedata.normalize("NFD", text)
        # Only the distinct non-ASCII characters need a category look-up, not every character of the text.
        marks = [ord(c) for c in set(text) if not c.isascii() and unicodedata.category(c) == "Mn"]
        if marks:
            text = text.translate(dict.fromkeys(marks))
    return text.strip()


class MinHasher:
    """MinHash signatures over word n-gram shingles, with datatrove's parameters and hash: the same seed gives the
    same signature as datatrove's `MinhashDedupSignature` (for documents of at least `ngram` words)."""

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        count = config.bands * config.rows
        # Drawn exactly as datatrove draws them, so signatures agree with a FineWeb run using the same seed.
        generator = np.random.RandomState(config.seed)
        self._a = generator.randint(1, _MERSENNE_61, dtype=np.uint64, size=count)
        self._b = generator.randint(0, _MERSENNE_61, dtype=np.uint64, size=count)

    def signature(self, text: str) -> np.ndarray:
        """uint64[bands*rows]: per hash function, the minimum over the shingles of `(a*h + b) mod (2^61-1)`.

        As in datatrove and datasketch, `a*h + b` wraps at 2^64 before the reduction (numpy uint64 arithmetic).
        """
        count = self.config.bands * self.config.rows
        signature = np.full(count, np.iinfo(np.uint64).max, dtype=np.uint64)
        scratch = np.empty((2, _SHINGLES_PER_BLOCK, count), dtype=np.uint64)
        for hashes in self._shingle_hashes(text):
            for start in range(0, len(hashes), _SHINGLES_PER_BLOCK):
                block = hashes[start : start + _SHINGLES_PER_BLOCK]
                x, high = scratch[0, : len(block)], scratch[1, : len(block)]
                np.multiply(block[:, None], self._a, out=x)
                np.add(x, self._b, out=x)
                # x mod (2^61-1) without a division: 2^61 = 1 there, so fold the top 3 bits onto the low 61, then
                # subtract the modulus where the sum reached it (min with the wrapped difference picks the right one).
                np.right_shift(x, np.uint64(61), out=high)
                np.bitwise_and(x, _MERSENNE_61, out=x)
                np.add(x, high, out=x)
                np.subtract(x, _MERSENNE_61, out=high)
                np.minimum(x, high, out=x)
                np.minimum(signature, x.min(axis=0), out=signature)
        return signature

    def band_hashes(self, text: str) -> np.ndarray:
        """uint64[bands]: xxh3_64 of each band's little-endian signature bytes."""
        bands = self.signature(text).astype("<u8").reshape(self.config.bands, self.config.rows)
        return np.fromiter((xxhash.xxh3_64_intdigest(band.tobytes()) for band in bands), np.uint64, len(bands))

    def _shingle_hashes(self, text: str) -> Iterator[np.ndarray]:
        """xxh64 of each `ngram`-word shingle, one array per 32K-character piece, so long texts stay in a few MB.

        A document of fewer than `ngram` words is one shingle (datatrove gives it no signature at all).
        """
        n = self.config.ngram
        carry: list[str] = []  # the last n-1 words of the previous piece, which start its final shingles
        emitted = False
        for piece in _pieces(text):
            words = carry + simplify_text(piece).split()
            if len(words) >= n:
                # A shingle is a slice of the UTF-8 bytes of the words joined by spaces: one encode per piece.
                spaced = " ".join(words).encode("utf-8", "surrogatepass")
                sizes = map(len, words if spaced.isascii() else map(_utf8, words))
                starts = list(map(add, accumulate(sizes, initial=0), range(len(words) + 1)))
                grams = [spaced[starts[i] : starts[i + n] - 1] for i in range(len(words) - n + 1)]
                yield np.fromiter(map(xxhash.xxh64_intdigest, grams), np.uint64, len(grams))
                emitted = True
            carry = words[len(words) - (n - 1) :] if n > 1 else []
        if not emitted:
            yield np.array([xxhash.xxh64_intdigest(" ".join(carry).encode("utf-8", "surrogatepass"))], np.uint64)


_utf8 = partial(str.encode, encoding="utf-8", errors="surrogatepass")


def _pieces(text: str) -> Iterator[str]:
    """`text` in pieces of about `_CHARS_PER_CHUNK` characters, each cut just before a whitespace character.

    The normalisation never joins characters across whitespace, so normalising pieces equals normalising the whole.
    """
    start = 0
    while len(text) - start > _CHARS_PER_CHUNK:
        match = _WHITESPACE.search(text, start + _CHARS_PER_CHUNK)
        if match is None:
            break
        yield text[start : match.start()]
        start = match.start()
    yield text[start:]


def near_duplicates(band_hashes: np.ndarray) -> np.ndarray:
    """bool[docs]: True for every document that shares a band hash with an EARLIER document (transitively: clusters by
    union-find keep only their lowest index). `band_hashes` is [docs, bands] and may be an np.memmap: process one band
    column at a time (argsort, equal runs) so memory is O(docs), never O(docs*bands) beyond the input."""
    if band_hashes.ndim != 2:
        raise SparkGPTError(f"near_duplicates: band_hashes must be [docs, bands], got shape {band_hashes.shape}")
    docs = band_hashes.shape[0]
    # parent[i] <= i always, and a root is the lowest index of its cluster: hooks only point roots at smaller roots.
    parent = np.arange(docs, dtype=np.int64)
    for band in range(band_hashes.shape[1]):
        column = np.array(band_hashes[:, band])
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        del column
        run_start = np.empty(docs, dtype=bool)
        run_start[:1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=run_start[1:])
        del ordered
        run_id = np.cumsum(run_start) - 1
        run_length = np.bincount(run_id)
        shared = run_length[run_id] > 1
        if not shared.any():
            continue
        members = order[shared]  # grouped by run, since `order` sorts by hash
        lengths = run_length[run_length > 1]
        firsts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        del order, run_start, run_id, run_length, shared
        # A root may sit in several runs, and one pass hooks it to only one of them: repeat until every run agrees.
        while True:
            roots = _roots(parent, members)
            target = np.repeat(np.minimum.reduceat(roots, firsts), lengths)
            if np.array_equal(roots, target):
                break
            np.minimum.at(parent, roots, target)
        parent = _roots(parent, parent)
    return parent != np.arange(docs)


def _roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The cluster root of each node, by pointer jumping (parents always point at lower indices, so it ends)."""
    current = parent[nodes]
    while True:
        upper = parent[current]
        if np.array_equal(upper, current):
            return current
        current = upper
