"""Retrieval speed: indexing throughput beside sentence-transformers' `encode` with the same MiniLM weights, and
search latency on an index of 100,000 chunks beside faiss' exact inner-product index.

1. Indexing: the bundled open-domain corpus and the tests' held-out corpus, chunked as `sparkgpt index` chunks
   them; sparkgpt embeds the chunks (`Embedder.embed`, which `Index.build` calls, in the dtype it timed fastest
   here), sentence-transformers encodes the same texts (batch 32, normalised) in float32, its default, and in
   bfloat16, rounds interleaved. The two must agree (cosine >= 0.9999 per chunk in float32, >= 0.999 in the chosen
   dtype). A whole `Index.build` (reading, chunking, BM25, writing) is timed too.
2. Search: 100,000 chunks of text drawn from the same corpora's words, with random unit vectors as embeddings (the
   speed of search does not depend on their values), written as a real index and searched through
   `Index.search` (query embedding included) in each mode; faiss' IndexFlatIP times the dense half alone.

    python benchmarks/bench_rag.py [--threads 2] [--chunks 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparkgpt import hardware
from sparkgpt.checkpoint.registry import resolve
from sparkgpt.rag import Embedder, Index
from sparkgpt.rag.documents import Chunk, find_files, read_documents, split_into_chunks
from sparkgpt.rag.index import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP, FORMAT, FORMAT_VERSION, _write

ROOT = Path(__file__).resolve().parent.parent
CORPORA = [ROOT / "sparkgpt" / "rag" / "data" / "corpus", ROOT / "tests" / "data" / "rag_heldout"]
QUERIES = ["Who designed the breakwater of the harbour?", "What is the flow rate of the Kestrel K-45 pump?",
           "When did the ropeworks close?", "How long is the warranty on a controller?",
           "Which festival floats lanterns on the river?", "What does the relay service action replace?"]


def chunk_texts(embedder: Embedder) -> list[str]:
    tokenizer = embedder.lm.tokenizer
    texts = []
    for path in find_files(CORPORA):
        try:
            documents = read_documents(path, str(path))
        except ValueError:
            continue
        texts += [c.text for d in documents for c in split_into_chunks(d, tokenizer, DEFAULT_CHUNK_TOKENS,
                                                                        DEFAULT_OVERLAP)]
    return texts


def bench_indexing(embedder: Embedder, rounds: int) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(resolve("minilm-l6")), device="cpu")
    reference_bf16 = SentenceTransformer(str(resolve("minilm-l6")), device="cpu",
                                         model_kwargs={"torch_dtype": torch.bfloat16})
    texts = chunk_texts(embedder) * 2
    theirs_vectors = reference.encode(texts, batch_size=32, normalize_embeddings=True)
    exact = float((embedder.lm.embed(texts).numpy() * theirs_vectors).sum(axis=1).min())
    chosen = embedder.lm.embedding_dtype
    agreement = float((embedder.embed(texts, dtype="auto") * theirs_vectors).sum(axis=1).min())
    print(f"indexing: {len(texts)} chunks; sparkgpt embeds in {chosen} here (timed); lowest cosine to "
          f"sentence-transformers' float32 vector of a chunk: {exact:.6f} in float32, {agreement:.6f} in {chosen}")
    assert exact >= 0.9999, "the two embedders disagree: not the same model"
    assert agreement >= 0.999, f"{chosen} moved a vector too far"
    timings: dict[str, list[float]] = {f"sparkgpt embed ({chosen})": [], "sentence-transformers float32": [],
                                       "sentence-transformers bfloat16": []}
    runs = [lambda: embedder.embed(texts, dtype="auto"),
            lambda: reference.encode(texts, batch_size=32, normalize_embeddings=True),
            lambda: reference_bf16.encode(texts, batch_size=32, normalize_embeddings=True)]
    for _ in range(rounds):
        for name, run in zip(timings, runs, strict=True):
            start = time.perf_counter()
            run()
            timings[name].append(len(texts) / (time.perf_counter() - start))
    best = {name: max(values) for name, values in timings.items()}
    for name, values in timings.items():
        print(f"  {name:<32}{best[name]:8.1f} chunks/s   (rounds: {', '.join(f'{x:.1f}' for x in values)})")
    ours, fp32, bf16 = best.values()
    print(f"  ratio to sentence-transformers  {ours / fp32:8.2f}x (its default, float32)   "
          f"{ours / bf16:.2f}x (bfloat16)")
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        index = Index.build(CORPORA, Path(folder) / "index", embedder=embedder, progress=False)
        seconds = time.perf_counter() - start
    print(f"  whole Index.build         {len(index) / seconds:8.1f} chunks/s   ({len(index)} chunks, {seconds:.1f} s: "
          "reading, chunking, embedding, BM25, writing)")


def bench_search(embedder: Embedder, n_chunks: int, rounds: int) -> None:
    import faiss

    words = " ".join(chunk_texts(embedder)).split()
    generator = random.Random(0)
    texts = [" ".join(generator.choices(words, k=150)) for _ in range(n_chunks)]
    vectors = np.random.default_rng(0).standard_normal((n_chunks, embedder.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk(f"synthetic/{i}.txt", 0, len(t), t) for i, t in enumerate(texts)]
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "embedder": embedder.name, "dim": embedder.dim,
                "embedder_probe": [float(x) for x in embedder.probe()], "chunk_tokens": DEFAULT_CHUNK_TOKENS,
                "overlap": DEFAULT_OVERLAP, "chunks": n_chunks, "files": {}, "skipped": []}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        (Path(folder) / "index").mkdir()
        index = _write(Path(folder) / "index", manifest, chunks, vectors, embedder)
        print(f"search: {n_chunks} chunks (BM25 built and written in {time.perf_counter() - start:.1f} s)")
        flat = faiss.IndexFlatIP(embedder.dim)
        flat.add(vectors)
        timings: dict[str, list[float]] = {"hybrid": [], "bm25": [], "dense": [], "faiss flat (dense half)": []}
        for _ in range(rounds):
            for query in QUERIES:
                for mode in ("hybrid", "bm25", "dense"):
                    start = time.perf_counter()
                    index.search(query, k=4, mode=mode)
                    timings[mode].append(1000 * (time.perf_counter() - start))
                start = time.perf_counter()
                flat.search(embedder.embed([query]), 50)
                timings["faiss flat (dense half)"].append(1000 * (time.perf_counter() - start))
    for name, values in timings.items():
        print(f"  {name:<26}p50 {statistics.median(values):7.1f} ms   p90 {np.percentile(values, 90):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--chunks", type=int, default=100_000, help="chunks in the search index (100000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {hardware.cpu().describe()}; threads {torch.get_num_threads()}")
    embedder = Embedder.load("minilm-l6")
    bench_indexing(embedder, args.rounds)
    bench_search(embedder, args.chunks, args.rounds)


if __name__ == "__main__":
    main()
