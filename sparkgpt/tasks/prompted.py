"""Zero- and few-shot applications: one pretrained model, many tasks, each from a prompt and a few examples.

Every task's prompt lives in `TEMPLATES` (one entry per task; change an entry to change the prompt). A prompt is
an instruction, optional solved examples, then the request; a chat model receives all of it as the user's turn
of its chat template, a base model as plain text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sparkgpt.errors import SparkGPTError
from sparkgpt.evaluate.loglik import encode_pair, prefix_token, score_continuations
from sparkgpt.lm import LM
from sparkgpt.rag.graph import KnowledgeGraph
from sparkgpt.rag.index import Index
from sparkgpt.tasks.grounded import GroundedAnswer, cite, graph_answer, sources_block


@dataclass(frozen=True)
class Template:
    """instruction: what is asked; request: one input, ending where the answer starts ({fields} filled in)."""

    instruction: str
    request: str


TEMPLATES: dict[str, Template] = {
    "classify": Template("Label each text with one of: {labels}.", "Text: {text}\nLabel:"),
    "answer": Template("Answer the question using the passage. Be brief.",
                       "Passage: {context}\nQuestion: {question}\nAnswer:"),
    "answer_closed_book": Template("Answer the question. Be brief.", "Question: {question}\nAnswer:"),
    "answer_sources": Template("Answer the question using only the numbered sources. Be brief, and cite the source "
                               "you use as [n]. If the sources do not say, answer that you don't know.",
                               "Sources:\n{sources}\n\nQuestion: {question}\nAnswer:"),
    "answer_facts": Template("Answer the question using only the facts. Be brief.",
                             "Facts:\n{facts}\nQuestion: {question}\nAnswer:"),
    "translate": Template("Translate from {source} to {target}.", "{source}: {text}\n{target}:"),
    "summarize": Template("Summarize the text in at most {max_words} words.", "Text: {text}\nSummary:"),
    "keywords": Template("List the {k} most important keywords of the text, separated by commas.",
                         "Text: {text}\nKeywords:"),
    "correct": Template("Correct the spelling and grammar of the sentence. Change nothing else.",
                        "Sentence: {text}\nCorrected:"),
    "continue": Template("Continue the text.", "{text}"),
    "story": Template("Write a short story from this premise.", "Premise: {premise}\nStory:"),
}


def build_prompt(lm: LM, task: str, fields: dict[str, Any], examples: Sequence[tuple[dict[str, Any], str]] = (),
                 chat: bool | None = None) -> str:
    """The prompt for a task: instruction, then (request + answer) for each example, then the request."""
    template = TEMPLATES[task]
    try:
        parts = [template.instruction.format(**fields)]
        parts += [template.request.format(**{**fields, **example}) + " " + answer for example, answer in examples]
        parts.append(template.request.format(**fields))
    except KeyError as missing:
        raise SparkGPTError(f"task {task!r}: the prompt needs a value for {missing}") from None
    return lm.instruction_prompt("\n\n".join(parts), chat)


def _generate(lm: LM, task: str, fields: dict[str, Any], examples, chat, **sampling: Any) -> str:
    return _generate_many(lm, task, [fields], examples, chat, **sampling)[0]


def _generate_many(lm: LM, task: str, fields: Sequence[dict[str, Any]], examples, chat, batch_size: int = 8,
                   **sampling: Any) -> list[str]:
    """One reply per set of fields, generated `batch_size` prompts at a time."""
    settings = {"temperature": 0, "max_new_tokens": 128, **sampling}
    if not lm.uses_chat_template(chat):
        settings.setdefault("stop", ["\n\n"])  # a base model would go on to invent the next example
    special = not lm.uses_chat_template(chat)
    ids = [lm._require_tokenizer().encode(build_prompt(lm, task, f, examples, chat), add_special_tokens=special)
           for f in fields]
    return [c.text.strip() for start in range(0, len(ids), batch_size)
            for c in lm.complete(ids[start:start + batch_size], **settings)]


def classify(
    lm: LM, text: str, labels: Sequence[str], examples: Sequence[tuple[str, str]] = (), calibrate: bool = True,
    chat: bool | None = False,
) -> dict[str, float]:
    """Zero-/few-shot classification by comparing how likely the model finds each label as the answer.

    Scores are mean log-probabilities per label token (so long labels are not penalised for their length),
    turned into probabilities with a softmax. `calibrate` (on by default) divides out the model's bias towards
    some labels, measured on a content-free input ("N/A"), as in Zhao et al. (2021), "Calibrate before use"
    (SmolLM2-135M-Instruct, bundled sets, zero-shot: sentiment 67% -> 70%, topic 53% -> 77%).
    `examples`: (text, label) pairs shown before the input. Plain-text prompts are the default even for chat
    models: a bare label reads naturally as the continuation of "Answer:", less so as a whole chat reply
    (SmolLM2-135M-Instruct: 86% zero-shot on the bundled sentiment set as plain text, 66% through its template).
    """
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise SparkGPTError("classify needs at least two distinct labels")
    shown = [({"text": t}, label) for t, label in examples]
    probabilities = _label_probabilities(lm, text, labels, shown, chat)
    if calibrate:
        bias = _label_probabilities(lm, "N/A", labels, shown, chat)
        scaled = [p / b for p, b in zip(probabilities, bias, strict=True)]
        probabilities = [p / sum(scaled) for p in scaled]
    return dict(zip(labels, probabilities, strict=True))


def _label_probabilities(lm: LM, text: str, labels: Sequence[str], examples, chat) -> list[float]:
    prompt = build_prompt(lm, "classify", {"text": text, "labels": ", ".join(labels)}, examples, chat)
    separator = "" if lm.uses_chat_template(chat) else " "
    pairs = [encode_pair(lm.tokenizer, prompt, separator + label) for label in labels]
    context = pairs[0][0] or [prefix_token(lm.tokenizer)]
    scores = score_continuations(lm.model, context, [continuation for _, continuation in pairs])
    means = [s.logprob / s.n_tokens for s in scores]
    top = max(means)
    weights = [math.exp(m - top) for m in means]
    return [w / sum(weights) for w in weights]


def answer(lm: LM, question: str, context: str | None = None, examples: Sequence[tuple[dict, str]] = (),
           chat: bool | None = None, index: Index | None = None, graph: KnowledgeGraph | None = None, k: int = 4,
           mode: str = "hybrid", constrain: bool = True, **sampling: Any) -> str | GroundedAnswer:
    """Reading comprehension from `context`, or closed-book without one. examples: ({"question", "context"}, answer).

    With an `index`, the answer is grounded in its `k` best chunks (`mode`: hybrid, bm25 or dense) and cites them
    as [n]; with a `graph`, in its facts (`constrain`: the answer is one of the graph's entities). Both return a
    `GroundedAnswer` (`.answer`, `.sources` or `.facts`, `.to_json()`)."""
    if index is not None and graph is not None:
        raise SparkGPTError("answer from an index or from a graph, not both")
    if index is not None:
        return answer_many(lm, [question], index, k, mode, examples, chat, **sampling)[0]
    _check_question(question)
    if graph is not None:
        def free_answer(facts: str) -> str:
            return _generate(lm, "answer_facts", {"question": question, "facts": facts}, examples, chat, **sampling)

        return graph_answer(lm, question, graph, constrain, chat=chat, generate=free_answer)
    task = "answer" if context is not None else "answer_closed_book"
    return _generate(lm, task, {"question": question, "context": context}, examples, chat, **sampling)


def answer_many(lm: LM, questions: Sequence[str], index: Index | None = None, k: int = 4, mode: str = "hybrid",
                examples: Sequence[tuple[dict, str]] = (), chat: bool | None = None, batch_size: int = 8,
                **sampling: Any) -> list[GroundedAnswer]:
    """Answers to many questions, generated in batches: grounded in `index` (with [n] citations), or closed-book
    without one."""
    for question in questions:
        _check_question(question)
    if index is None:
        replies = _generate_many(lm, "answer_closed_book", [{"question": q} for q in questions], examples, chat,
                                 batch_size, **sampling)
        return [GroundedAnswer(reply) for reply in replies]
    hits = [index.search(q, k=k, mode=mode) for q in questions]
    fields = [{"question": q, "sources": sources_block(h)} for q, h in zip(questions, hits, strict=True)]
    replies = _generate_many(lm, "answer_sources", fields, examples, chat, batch_size, **sampling)
    return [GroundedAnswer(cite(reply, h), sources=h) for reply, h in zip(replies, hits, strict=True)]


def _check_question(question: str) -> None:
    if not isinstance(question, str) or not question.strip():
        raise SparkGPTError("the question is empty")


def translate(lm: LM, text: str, source: str = "English", target: str = "French",
              examples: Sequence[tuple[str, str]] = (), chat: bool | None = None, **sampling: Any) -> str:
    shown = [({"text": s}, t) for s, t in examples]
    return _generate(lm, "translate", {"text": text, "source": source, "target": target}, shown, chat, **sampling)


def summarize(lm: LM, text: str, max_words: int = 30, examples: Sequence[tuple[str, str]] = (),
              chat: bool | None = None, **sampling: Any) -> str:
    """examples: (text, summary) pairs shown before the input."""
    shown = [({"text": t}, summary) for t, summary in examples]
    return _generate(lm, "summarize", {"text": text, "max_words": max_words}, shown, chat, **sampling)


def keywords(lm: LM, text: str, k: int = 5, examples: Sequence[tuple[str, Sequence[str]]] = (),
             chat: bool | None = None, **sampling: Any) -> list[str]:
    """examples: (text, [keyword, ...]) pairs shown before the input."""
    shown = [({"text": t}, ", ".join(words)) for t, words in examples]
    reply = _generate(lm, "keywords", {"text": text, "k": k}, shown, chat, **sampling)
    # Small models often answer with a numbered or bulleted list instead of commas: accept both.
    found = [re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", w).strip(" .") for w in reply.replace("\n", ",").split(",")]
    return [w for w in dict.fromkeys(found) if w][:k]


def correct(lm: LM, text: str, examples: Sequence[tuple[str, str]] = (), chat: bool | None = None,
            **sampling: Any) -> str:
    shown = [({"text": wrong}, right) for wrong, right in examples]
    return _generate(lm, "correct", {"text": text}, shown, chat, **sampling)


def continue_text(lm: LM, text: str, **sampling: Any) -> str:
    """Continue a text as a base model would (no chat template: the text itself is the prompt)."""
    return lm.generate(text, **{"max_new_tokens": 64, **sampling})


def write_story(lm: LM, premise: str, examples: Sequence[tuple[str, str]] = (), chat: bool | None = None,
                **sampling: Any) -> str:
    """examples: (premise, story) pairs shown before the input."""
    settings = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 300, **sampling}
    shown = [({"premise": p}, story) for p, story in examples]
    return _generate(lm, "story", {"premise": premise}, shown, chat, **settings)


__all__ = ["TEMPLATES", "Template", "answer", "answer_many", "build_prompt", "classify", "continue_text", "correct",
           "keywords", "summarize", "translate", "write_story"]
