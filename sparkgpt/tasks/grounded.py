"""Answers grounded in knowledge: retrieved passages with [n] citations, or facts of a knowledge graph.

From an index, the k best chunks go into the prompt numbered [1]..[k] and the model is asked to cite what it
uses. Small models often answer without citing, so the answer is then attributed: it cites each source that holds
most of its words. From a graph, the walks that best match the question (`KnowledgeGraph.paths`) give the facts,
written as sentences; by default the answer is constrained to the entities those walks reach, the model choosing
among the best-scored ones by likelihood, so it can never state an entity the graph does not hold. A question
whose entities the graph does not know gets an answer that says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sparkgpt.evaluate.loglik import encode_pair, prefix_token, score_continuations
from sparkgpt.evaluate.metrics import normalize_answer
from sparkgpt.lm import LM
from sparkgpt.rag.graph import KnowledgeGraph, Walk
from sparkgpt.rag.index import Hit

UNKNOWN_ENTITY = "I don't know: the knowledge graph has no entity named in the question."
NO_FACT = "I don't know: the knowledge graph holds no fact that answers the question."
_CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class GroundedAnswer:
    """An answer and what it rests on: `sources` (index hits, cited as [n] in order) or `facts` (graph
    sentences)."""

    answer: str
    sources: list[Hit] = field(default_factory=list)
    facts: list[str] | None = None

    def __str__(self) -> str:
        return self.answer

    def to_json(self) -> dict[str, Any]:
        if self.facts is not None:
            return {"answer": self.answer, "facts": self.facts}
        return {"answer": self.answer, "sources": [hit.to_json() for hit in self.sources]}


def sources_block(hits: list[Hit]) -> str:
    """The retrieved chunks as the prompt shows them, numbered [1] (the best) to [k], each with the file it came
    from, the best written last: next to the question, where models read most closely (Liu et al. 2023, "Lost in
    the middle"; figures in benchmarks/RESULTS.md)."""
    return "\n\n".join(f"[{n}] ({hit.chunk.source}) {' '.join(hit.chunk.text.split())}"
                       for n, hit in reversed(list(enumerate(hits, start=1))))


def cite(answer: str, hits: list[Hit]) -> str:
    """The answer with valid citations: [n] beyond the sources removed; if none is left, [n] added for each source
    holding at least half of the answer's words (the best first, at most two)."""
    answer = _CITATION.sub(lambda m: m.group(0) if 1 <= int(m.group(1)) <= len(hits) else "", answer).strip()
    if _CITATION.search(answer) or not hits:
        return answer
    words = set(normalize_answer(answer).split())
    if not words:
        return answer
    overlap = [(len(words & set(normalize_answer(h.chunk.text).split())) / len(words), n)
               for n, h in enumerate(hits, start=1)]
    cited = [n for share, n in sorted(overlap, key=lambda x: (-x[0], x[1])) if share >= 0.5][:2]
    return answer + "".join(f" [{n}]" for n in sorted(cited))


def uncited(answer: str) -> str:
    """The answer without its [n] citations (to score it against plain reference answers)."""
    return " ".join(_CITATION.sub("", answer).split())


def graph_answer(lm: LM, question: str, graph: KnowledgeGraph, constrain: bool = True, max_facts: int = 8,
                 chat: bool | None = None, generate: Callable[[str], str] | None = None) -> GroundedAnswer:
    """Answer from the facts of the best-scored walks (at most `max_facts`). `generate(facts) -> str` writes a
    free answer when `constrain` is off."""
    entities = graph.link(question)
    if not entities:
        return GroundedAnswer(UNKNOWN_ENTITY, facts=[])
    walks = graph.paths(question, entities)
    if not walks or walks[0].score <= 0:
        facts = [t.sentence() for e in entities for t in graph.facts(e)][:max_facts]
        return GroundedAnswer(NO_FACT, facts=facts)
    best = [w for w in walks if w.score == walks[0].score and len(w.steps) == len(walks[0].steps)]
    facts = list(dict.fromkeys(t.sentence() for w in best for t in w.steps))[:max_facts]
    if not constrain:
        if generate is None:
            raise ValueError("an unconstrained graph answer needs `generate`")
        return GroundedAnswer(generate("\n".join(facts)), facts=facts)
    return GroundedAnswer(_likeliest(lm, question, facts, best, chat), facts=facts)


def _likeliest(lm: LM, question: str, facts: list[str], walks: list[Walk], chat: bool | None) -> str:
    """Among the entities the best walks reach, the one the model finds likeliest as the answer."""
    candidates = list(dict.fromkeys(w.answer for w in walks))
    if len(candidates) == 1:
        return candidates[0]
    use_chat = lm.uses_chat_template(chat)
    prompt = lm.instruction_prompt("Answer the question using the facts.\n\nFacts:\n" + "\n".join(facts)
                                   + f"\nQuestion: {question}\nAnswer:", chat)
    separator = "" if use_chat else " "
    pairs = [encode_pair(lm._require_tokenizer(), prompt, separator + c) for c in candidates]
    context = pairs[0][0] or [prefix_token(lm.tokenizer)]
    scores = score_continuations(lm.model, context, [continuation for _, continuation in pairs])
    means = [s.logprob / max(1, s.n_tokens) for s in scores]
    return candidates[max(range(len(candidates)), key=means.__getitem__)]
