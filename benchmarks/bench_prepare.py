"""Documents/s of the web pipeline — Common Crawl WET -> quality rules -> deduplication -> tokens — beside
datatrove's local executor doing the same work on the same files in the same run.

The input: `--files` WET files written with warcio, `--records` records each (prose of about 2.5 KB, with 10%
exact copies, 10% near copies and 10% boilerplate pages planted). Both pipelines run with `--workers` processes,
one task per file, and SmolLM2's tokenizer (written to a tokenizer.json both read):

- sparkgpt: `prepare(files, tokenizer=DIR)` with its defaults for web text (Gopher quality and repetition rules, the
  C4 rules, exact and MinHash near deduplication with FineWeb's 5-grams, 14 bands of 8), token shards out;
- datatrove: WarcReader -> GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter ->
  MinhashDedupSignature (+ JsonlWriter), MinhashDedupBuckets, MinhashDedupCluster, then JsonlReader ->
  MinhashDedupFilter -> DocumentTokenizer: FineWeb's recipe, four stages (it has no exact-dedup stage; MinHash
  catches exact copies too).

Rounds alternate between the two (this machine's speed drifts); the best round of each is reported with the ratio.
The kept-document counts of both are printed: with the same rules they must be close.

    python benchmarks/bench_prepare.py [--files 4] [--records 2500] [--workers 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import shutil
import tempfile
import time
from pathlib import Path

from sparkgpt import hardware
from sparkgpt.data import prepare
from sparkgpt.tokenizer import Tokenizer

_WORDS = {
    "nouns": "river market garden engine village teacher harbour library mountain bridge window forest kitchen station "
             "painter island castle farmer soldier letter school doctor museum valley tower sailor orchard meadow "
             "factory theatre council railway student printer cathedral merchant",
    "verbs": "visited described repaired followed painted crossed protected remembered measured opened carried "
             "watched built found studied answered named moved",
    "adjectives": "old quiet northern busy narrow famous small bright ancient wooden crowded distant green modern "
                  "gentle broken royal hidden early silent",
}
NOUNS, VERBS, ADJECTIVES = (_WORDS[kind].split() for kind in ("nouns", "verbs", "adjectives"))


def article(rng: random.Random, sentences: int = 18) -> str:
    pick = rng.choice
    return " ".join(f"The {pick(ADJECTIVES)} {pick(NOUNS)} {pick(VERBS)} the {pick(NOUNS)} of a {pick(ADJECTIVES)} "
                    f"{pick(NOUNS)} that was near the {pick(NOUNS)} and {pick(VERBS)} it with {pick(ADJECTIVES)} "
                    "care." for _ in range(sentences))


def write_corpus(folder: Path, files: int, records: int, seed: int = 0) -> int:
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    written: list[str] = []
    for index in range(files):
        with open(folder / f"crawl-{index:03d}.warc.wet.gz", "wb") as handle:
            writer = WARCWriter(handle, gzip=True)
            for record in range(records):
                roll = rng.random()
                if written and roll < 0.1:
                    text = rng.choice(written)  # an exact copy
                elif written and roll < 0.2:
                    sentences = rng.choice(written).split(". ")
                    sentences[len(sentences) // 2] = article(rng, 1).rstrip(".")
                    text = ". ".join(sentences)  # a near copy: one sentence rewritten
                elif roll < 0.3:
                    text = "Home | About | Contact\nClick here\nLogin"  # boilerplate the quality rules remove
                else:
                    text = article(rng)
                    written.append(text)
                uri = f"http://site{index}.example/{record}"
                writer.write_record(writer.create_warc_record(
                    uri, "conversion", payload=io.BytesIO(text.encode()),
                    warc_headers_dict={"Content-Type": "text/plain"}))
    return files * records


def run_sparkgpt(inputs: Path, tokenizer_dir: Path, out: Path, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    result = prepare([inputs], out, tokenizer=str(tokenizer_dir), workers=workers, progress=False)
    return time.perf_counter() - start, result.documents


def _xxhash64(data: str | bytes) -> int:
    """datatrove 0.10's shingle hash passes str, which xxhash 4 no longer encodes itself: encode it here."""
    import xxhash

    return xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)


def run_datatrove(inputs: Path, tokenizer_file: Path, work: Path, files: int, workers: int) -> tuple[float, int]:
    import datatrove.utils.hashes.xxhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from loguru import logger

    datatrove.utils.hashes.xxhash.xxhash64 = _xxhash64
    logger.remove()  # datatrove's per-step statistics would drown the comparison
    config = MinhashConfig()
    stages = [
        LocalPipelineExecutor(pipeline=[
            WarcReader(str(inputs), glob_pattern="*.warc.wet.gz"), GopherRepetitionFilter(), GopherQualityFilter(),
            C4QualityFilter(), JsonlWriter(str(work / "filtered")),
        ], tasks=files, workers=workers, logging_dir=str(work / "logs" / "1"), skip_completed=False),
        LocalPipelineExecutor(pipeline=[
            JsonlReader(str(work / "filtered")), MinhashDedupSignature(str(work / "signatures"), config=config),
        ], tasks=files, workers=workers, logging_dir=str(work / "logs" / "2"), skip_completed=False),
        LocalPipelineExecutor(pipeline=[
            MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config),
        ], tasks=config.num_buckets, workers=workers, logging_dir=str(work / "logs" / "3"), skip_completed=False),
        LocalPipelineExecutor(pipeline=[
            MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config),
        ], tasks=1, logging_dir=str(work / "logs" / "4"), skip_completed=False),
        LocalPipelineExecutor(pipeline=[
            JsonlReader(str(work / "filtered")), MinhashDedupFilter(str(work / "remove")),
            DocumentTokenizer(str(work / "tokens"), tokenizer_name_or_path=str(tokenizer_file),
                              eos_token="<|endoftext|>"),
        ], tasks=files, workers=workers, logging_dir=str(work / "logs" / "5"), skip_completed=False),
    ]
    start = time.perf_counter()
    for stage in stages:
        stage.run()
    seconds = time.perf_counter() - start
    written = 0
    for path in (work / "filtered").glob("*.jsonl.gz"):
        with gzip.open(path, "rt") as lines:
            written += sum(1 for _ in lines)
    return seconds, written - _removed(work / "remove")


def _removed(folder: Path) -> int:
    return sum(path.stat().st_size // 4 for path in folder.glob("*.remove"))  # one uint32 per removed document


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--records", type=int, default=2500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"CPU: {hardware.cpu().describe()}; workers {args.workers}")

    import sparkgpt

    root = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        inputs = root / "inputs"
        inputs.mkdir()
        documents = write_corpus(inputs, args.files, args.records)
        size = sum(path.stat().st_size for path in inputs.iterdir())
        tokenizer: Tokenizer = sparkgpt.load("smollm2-135m-instruct", device="cpu").tokenizer
        tokenizer_dir = root / "tokenizer"
        tokenizer_dir.mkdir()
        tokenizer.save(tokenizer_dir)
        print(f"input: {args.files} WET files, {documents:,} records, {size / 1e6:.1f} MB compressed")
        times: dict[str, list[float]] = {"sparkgpt": [], "datatrove": []}
        kept: dict[str, int] = {}
        for round_index in range(args.rounds):
            for name in ("sparkgpt", "datatrove") if round_index % 2 == 0 else ("datatrove", "sparkgpt"):
                work = root / f"{name}-{round_index}"
                if name == "sparkgpt":
                    seconds, kept[name] = run_sparkgpt(inputs, tokenizer_dir, work, args.workers)
                else:
                    work.mkdir()
                    seconds, kept[name] = run_datatrove(inputs, tokenizer_dir / "tokenizer.json", work, args.files,
                                                        args.workers)
                times[name].append(seconds)
                print(f"round {round_index + 1} {name:<9} {seconds:6.2f} s  {documents / seconds:8,.0f} docs/s  "
                      f"kept {kept[name]:,}")
                shutil.rmtree(work, ignore_errors=True)
        ours, theirs = min(times["sparkgpt"]), min(times["datatrove"])
        print(f"best: sparkgpt {documents / ours:,.0f} docs/s, datatrove {documents / theirs:,.0f} docs/s, "
              f"ratio {theirs / ours:.2f}x; kept documents {kept['sparkgpt']:,} vs {kept['datatrove']:,}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
