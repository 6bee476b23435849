"""A knowledge graph of (subject, relation, object) triples, and the retrieval that answers questions from it.

    graph = KnowledgeGraph.load("countries.jsonl")   # {"subject", "relation", "object"} per line, or TSV
    graph.link("What currency is used in the country whose capital is Nairobi?")   # ["Nairobi"]
    graph.paths(question)   # walks from the linked entities, best first: Nairobi <-has capital- Kenya
                            # -uses currency-> Kenyan shilling

A fact reads as the sentence "{subject} {relation} {object}." (so relations are best named as verb phrases:
"has capital", "uses currency"). The relation "alias" gives an entity another name the linker knows.

Entity linking: the longest names and aliases written in the question (case and punctuation aside), then, for
capitalised words left unlinked, the one name a typo away (two for long names), or with an embedder a name whose
embedding is very close. A question whose entities are all unknown links to nothing, and then nothing is
retrieved: the answer says so rather than guess. Walks of one or two hops from each linked entity (both
directions) are scored by how many of their relations the question names (its words, or an embedder's similarity
between words and relation names), with a cost for each hop it does not ask for (a relation named once counts once).
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_jsonl
from sparkgpt.rag.index import Embedder

ALIAS = "alias"
_WORD = re.compile(r"\w+(?:[-'’]\w+)*", re.UNICODE)
_STOPWORD_TEXT = """a an the of in on at to for from by with and or is are was were be been being has have had
do does did what which who whom whose where when why how that this these those it its as into than then there their
they them he she his her i you your we our us me my can could would should will shall may might must not no any
some one please tell name give list use uses used"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
UNHOPPED_COST = 0.5  # a hop whose relation the question does not name costs half of a named one's gain
# MiniLM cosines (benchmarks/RESULTS.md): Holland~Netherlands 0.90, Burma~Myanmar 0.94, Deutschland~Germany 0.84,
# an invented name to its nearest country below 0.3; money~currency 0.59, continent~region 0.61, speak~language 0.34.
EMBEDDING_LINK = 0.8  # cosine for an unknown name to link to a known one by meaning (another name, a translation)
EMBEDDING_RELATION = 0.55  # cosine for a question word to count as naming a relation's content word(s)


@dataclass(frozen=True)
class Triple:
    subject: str
    relation: str
    object: str

    def sentence(self) -> str:
        return f"{self.subject} {self.relation} {self.object}."


@dataclass(frozen=True)
class Walk:
    """A walk from a linked entity: `steps` are the triples in order, `answer` the entity reached."""

    start: str
    steps: tuple[Triple, ...]
    answer: str
    score: float


class KnowledgeGraph:
    def __init__(self, triples: Iterable[Triple], embedder: Embedder | None = None) -> None:
        self.triples: list[Triple] = []
        self.names: dict[str, str] = {}  # normalised name or alias -> entity
        self.edges: dict[str, list[Triple]] = defaultdict(list)  # entity -> triples it is subject or object of
        aliases = []
        for triple in triples:
            if triple.relation == ALIAS:
                aliases.append(triple)
                continue
            self.triples.append(triple)
            self.edges[triple.subject].append(triple)
            if triple.object != triple.subject:
                self.edges[triple.object].append(triple)
        for entity in self.edges:
            self.names.setdefault(normalise(entity), entity)
        for triple in aliases:
            self.names.setdefault(normalise(triple.object), triple.subject)
        self.embedder = embedder
        self.relations = sorted({t.relation for t in self.triples})
        self._longest = max((len(name.split()) for name in self.names), default=0)

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> KnowledgeGraph:
        """Triples from JSONL ({"subject", "relation", "object"} per line) or TSV (subject, relation, object
        columns; a header row of those names is skipped). A bad line is a one-line error naming it."""
        path = Path(path)
        triples = list(_read_tsv(path) if path.suffix.lower() in (".tsv", ".tab") else _read_jsonl(path))
        if not triples:
            raise SparkGPTError(f"{path}: no triples")
        return cls(triples, embedder)

    def __len__(self) -> int:
        return len(self.triples)

    def facts(self, entity: str) -> list[Triple]:
        return list(self.edges.get(entity, ()))

    # -- entity linking -----------------------------------------------------------------------------------------

    def link(self, question: str) -> list[str]:
        """The graph's entities named in `question`, in order of appearance."""
        words = [m.group(0) for m in _WORD.finditer(question)]
        normalised = [normalise(w) for w in words]
        linked: list[tuple[int, str]] = []
        used = [False] * len(words)
        for length in range(min(self._longest, len(words)), 0, -1):  # longest names first
            for start in range(len(words) - length + 1):
                if any(used[start:start + length]):
                    continue
                entity = self.names.get(" ".join(normalised[start:start + length]))
                if entity is not None and not (length == 1 and normalised[start] in _STOPWORDS):
                    linked.append((start, entity))
                    used[start:start + length] = [True] * length
        if not linked:
            linked = self._link_approximately(words, used)
        return list(dict.fromkeys(entity for _, entity in sorted(linked)))

    def _link_approximately(self, words: list[str], used: list[bool]) -> list[tuple[int, str]]:
        """Unlinked capitalised words (and pairs of them) spelled almost like a name, or, with an embedder,
        meaning almost the same."""
        spans = [(i, j) for i in range(len(words)) for j in (i + 1, i + 2) if j <= len(words)
                 and not any(used[i:j]) and all(w[:1].isupper() for w in words[i:j])
                 and normalise(words[i]) not in _STOPWORDS]
        found = []
        for start, end in spans:
            phrase = normalise(" ".join(words[start:end]))
            if len(phrase) < 5:
                continue  # one edit turns most short words into some other name
            allowed = 1 if len(phrase) < 10 else 2
            close = [name for name in self.names if abs(len(name) - len(phrase)) <= allowed
                     and edit_distance(phrase, name) <= allowed]
            if len({self.names[name] for name in close}) == 1:
                found.append((start, self.names[close[0]]))
        if found or self.embedder is None or not spans:
            return found
        phrases = [" ".join(words[start:end]) for start, end in spans]
        similarity = self.embedder.embed(phrases) @ self._name_vectors.T
        for (start, _), row in zip(spans, similarity, strict=True):
            best = int(np.argmax(row))
            if row[best] >= EMBEDDING_LINK:
                found.append((start, self.names[self._name_keys[best]]))
        return found

    @cached_property
    def _name_keys(self) -> list[str]:
        return sorted(self.names)

    @cached_property
    def _name_vectors(self) -> np.ndarray:
        return self.embedder.embed(self._name_keys)

    # -- paths --------------------------------------------------------------------------------------------------

    def paths(self, question: str, entities: Sequence[str] | None = None, max_hops: int = 2) -> list[Walk]:
        """Walks of 1..max_hops from the linked entities, best first (score, then fewer hops, then name)."""
        entities = self.link(question) if entities is None else list(entities)
        named = self._named_relations(question)
        paths = []
        for start in entities:
            frontier = [((), start)]
            for _ in range(max_hops):
                grown = []
                for steps, here in frontier:
                    for triple in self.edges.get(here, ()):
                        there = triple.object if triple.subject == here else triple.subject
                        if there == start or any(there in (t.subject, t.object) for t in steps):
                            continue  # no walking back
                        walk = (*steps, triple)
                        grown.append((walk, there))
                        if there not in entities:
                            paths.append(Walk(start, walk, there, _score(walk, named)))
                frontier = grown
        return sorted(paths, key=lambda p: (-p.score, len(p.steps), p.answer))

    def _named_relations(self, question: str) -> dict[str, float]:
        """How strongly the question names each relation (0..1): the share of the relation's content words it
        contains (plurals folded), or with an embedder the best similarity of a question word to the relation."""
        words = {_stem(normalise(w)) for w in _WORD.findall(question)} - {_stem(w) for w in _STOPWORDS}
        strength = {}
        for relation in self.relations:
            content = [_stem(w) for w in normalise(relation).split() if w not in _STOPWORDS] or [_stem(relation)]
            strength[relation] = sum(w in words for w in content) / len(content)
        if self.embedder is not None and words:
            question_words = sorted(words)
            similarity = self.embedder.embed(question_words) @ self._relation_vectors.T
            for column, relation in enumerate(self.relations):
                best = float(similarity[:, column].max())
                if best >= EMBEDDING_RELATION:
                    strength[relation] = max(strength[relation], best)
        return strength

    @cached_property
    def _relation_vectors(self) -> np.ndarray:
        """Each relation by its content words ("uses currency" -> "currency"): a word matches those, not the verb."""
        return self.embedder.embed([" ".join(w for w in normalise(r).split() if w not in _STOPWORDS) or r
                                    for r in self.relations])


def _score(steps: Sequence[Triple], named: dict[str, float]) -> float:
    """Each named relation counts once: a second hop over the same relation (France -is in region-> Europe
    <-is in region- Albania) is a hop the question did not ask for."""
    seen, score = set(), 0.0
    for triple in steps:
        gain = named.get(triple.relation, 0.0) if triple.relation not in seen else 0.0
        score += gain or -UNHOPPED_COST
        seen.add(triple.relation)
    return score


def edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and transpositions of neighbours turning a into b (Damerau)."""
    previous, current = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        before, previous, current = previous, current, [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], before[j - 2] + 1)
    return current[len(b)]


def normalise(text: str) -> str:
    return " ".join(m.group(0).casefold() for m in _WORD.finditer(text))


def _stem(word: str) -> str:
    for suffix in ("ies", "es", "s"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def _read_jsonl(path: Path) -> Iterable[Triple]:
    for number, record in read_jsonl(path):
        yield _triple(path, number, [record.get(k) for k in ("subject", "relation", "object")])


def _read_tsv(path: Path) -> Iterable[Triple]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SparkGPTError(f"{path}: no such graph file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SparkGPTError(f"{path}: not readable UTF-8 text ({error})") from None
    for number, row in enumerate(csv.reader(text.splitlines(), delimiter="\t"), start=1):
        if not row or (number == 1 and [c.strip().lower() for c in row[:3]] == ["subject", "relation", "object"]):
            continue
        yield _triple(path, number, row if len(row) == 3 else None)


def _triple(path: Path, number: int, values: list | None) -> Triple:
    if values is None or not all(isinstance(v, str) and v.strip() for v in values):
        raise SparkGPTError(f"{path}:{number}: expected a triple of three non-empty strings "
                            "(subject, relation, object)")
    return Triple(*(v.strip() for v in values))
