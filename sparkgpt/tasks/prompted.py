"""Zero- and few-shot applications: one pretrained model, many tasks, each from a prompt and a few examples.

Every task's prompt lives in `TEMPLATES` (one entry per task; change an entry to change the prompt). A prompt is
an instruction, optional solved examples, then the request; a chat model receives all of it as the user's turn
of its chat template, a base model as plain text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sparkgpt.errors import SparkGPTError
from sparkgpt.evaluate.loglik import encode_pair, encode_reply, prefix_token, score_batch
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


Labelled = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class ClassifierChoice:
    """The prompt format `classify` used, and why. `chat`: each label is scored as the assistant's whole reply
    under the chat template (else as the plain-text continuation of the prompt); `calibrate`: the content-free
    correction of Zhao et al. (2021); `accuracy`: each candidate format's leave-one-out accuracy on the labelled
    examples, when the format was chosen on them."""

    chat: bool
    calibrate: bool
    reason: str
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return _format_name(self.chat, self.calibrate)


def _format_name(chat: bool, calibrate: bool) -> str:
    return f"{'chat' if chat else 'plain'}, {'calibrated' if calibrate else 'uncalibrated'}"


class Classification(dict[str, float]):
    """{label: probability}, with the prompt format that gave them (`.choice`)."""

    def __init__(self, probabilities: dict[str, float], choice: ClassifierChoice) -> None:
        super().__init__(probabilities)
        self.choice = choice


def classify(
    lm: LM, text: str, labels: Sequence[str], examples: Labelled = (), calibrate: bool | None = None,
    chat: bool | None = None, dev: Labelled = (),
) -> Classification:
    """Zero-/few-shot classification by comparing how likely the model finds each label as the answer.

    Scores are mean log-probabilities per label token (so long labels are not penalised for their length),
    turned into probabilities with a softmax. `calibrate` divides out the model's bias towards some labels,
    measured on a content-free input ("N/A"), as in Zhao et al. (2021), "Calibrate before use". `chat` scores
    each label as the assistant's reply under the model's chat template (ended by its end-of-turn token).
    `examples`: (text, label) pairs shown before the input; `dev`: (text, label) pairs only used to choose the
    format. What `chat` and `calibrate` leave as None is chosen by `choose_format` (with no labelled pairs: the
    plain prompt, calibrated); the result's `.choice` says which format and why. SmolLM2-135M-Instruct (Q4_1) on
    40 reviews written outside the project: plain calibrated 0.80, its chat template 0.55 (transformers, scoring
    the label as the reply, 0.55 too).
    """
    return classify_many(lm, [text], labels, examples, calibrate, chat, dev)[0]


def classify_many(
    lm: LM, texts: Sequence[str], labels: Sequence[str], examples: Labelled = (), calibrate: bool | None = None,
    chat: bool | None = None, dev: Labelled = (), batch_size: int = 8,
) -> list[Classification]:
    """`classify` for many texts: the format is chosen once and the texts are scored `batch_size` at a time."""
    choice = choose_format(lm, labels, examples, dev, calibrate, chat, batch_size)
    shown = _shown(examples)
    requests = [(text, shown) for text in texts] + ([("N/A", shown)] if choice.calibrate else [])
    probabilities = _label_probabilities(lm, requests, labels, choice.chat, batch_size)
    if choice.calibrate:
        *probabilities, bias = probabilities
        probabilities = [_calibrated(p, bias) for p in probabilities]
    return [Classification(dict(zip(labels, p, strict=True)), choice) for p in probabilities]


def choose_format(
    lm: LM, labels: Sequence[str], examples: Labelled = (), dev: Labelled = (), calibrate: bool | None = None,
    chat: bool | None = None, batch_size: int = 8,
) -> ClassifierChoice:
    """The prompt format of `classify` among the candidates {plain, chat} x {calibrated, uncalibrated} that
    `chat` and `calibrate` leave open. Without labelled examples: the default, chosen on principle; with them,
    the candidate with the best leave-one-out accuracy (each of `examples` scored with the others shown, each
    of `dev` with all of them), ties going to the default."""
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise SparkGPTError("classify needs at least two distinct labels")
    for text, label in [*examples, *dev]:
        if label not in labels:
            raise SparkGPTError(f"the example {text[:40]!r} has the label {label!r}, not one of {', '.join(labels)}")
    # Plain text first even for a chat model: a bare label is the natural continuation of "Label:", but an unlikely
    # whole reply from a model tuned to answer in sentences, so scoring it as the reply compares improbable tails.
    chats = [lm.uses_chat_template(chat)] if chat is not None else [False, True] if lm.uses_chat_template() else [False]
    calibrations = [calibrate] if calibrate is not None else [True, False]
    # Content-free calibration was made for, and measured on, plain-text prompts (Zhao et al. 2021); a chat reply
    # is scored as it stands, as transformers' and lm-evaluation-harness's chat-template scoring do.
    candidates = [(c, k) for c in chats for k in (not c, c) if k in calibrations]
    if len(candidates) == 1:
        return ClassifierChoice(*candidates[0], "given")
    if not examples and not dev:
        return ClassifierChoice(*candidates[0], "the default: no labelled examples to choose on")
    accuracy = _leave_one_out(lm, labels, examples, dev, chats, calibrations, batch_size)
    best = max(candidates, key=accuracy.__getitem__)  # the first of equals: the default
    return ClassifierChoice(*best, f"leave-one-out accuracy on {len(examples) + len(dev)} labelled examples",
                            {_format_name(*c): accuracy[c] for c in candidates})


def _leave_one_out(lm: LM, labels: Sequence[str], examples: Labelled, dev: Labelled, chats: list[bool],
                   calibrations: list[bool], batch_size: int) -> dict[tuple[bool, bool], float]:
    """Accuracy of each (chat, calibrate) candidate. A format's label scores are computed once and serve both
    calibrations; each fold's content-free bias is computed once and serves all the texts of that fold."""
    shown = _shown(examples)
    folds = [(shown[:i] + shown[i + 1:], [example]) for i, example in enumerate(examples)]
    folds += [(shown, list(dev))] if dev else []
    gold = [label for _, fold in folds for _, label in fold]
    accuracy = {}
    for chat in chats:
        requests = [(text, context) for context, fold in folds
                    for text in [*(t for t, _ in fold), *(["N/A"] if True in calibrations else [])]]
        probabilities = iter(_label_probabilities(lm, requests, labels, chat, batch_size))
        predicted: dict[bool, list[list[float]]] = {False: [], True: []}
        for _, fold in folds:
            raw = [next(probabilities) for _ in fold]
            predicted[False] += raw
            if True in calibrations:
                bias = next(probabilities)
                predicted[True] += [_calibrated(p, bias) for p in raw]
        for calibrate in calibrations:
            right = [labels[p.index(max(p))] == g for p, g in zip(predicted[calibrate], gold, strict=True)]
            accuracy[chat, calibrate] = sum(right) / len(right)
    return accuracy


def _shown(examples: Labelled) -> list[tuple[dict[str, Any], str]]:
    return [({"text": text}, label) for text, label in examples]


def _calibrated(probabilities: list[float], bias: list[float]) -> list[float]:
    scaled = [p / b for p, b in zip(probabilities, bias, strict=True)]
    return [s / sum(scaled) for s in scaled]


def _label_probabilities(lm: LM, requests: Sequence[tuple[str, Sequence[tuple[dict[str, Any], str]]]],
                         labels: Sequence[str], chat: bool, batch_size: int) -> list[list[float]]:
    """The label probabilities of each (text, examples shown), scored `batch_size` requests per batch."""
    encoded = [_encode_labels(lm, text, labels, shown, chat) for text, shown in requests]
    scores = [row for start in range(0, len(encoded), batch_size)
              for row in score_batch(lm.model, encoded[start:start + batch_size])]
    probabilities = []
    for row in scores:
        means = [s.logprob / s.n_tokens for s in row]
        weights = [math.exp(m - max(means)) for m in means]
        probabilities.append([w / sum(weights) for w in weights])
    return probabilities


def _encode_labels(lm: LM, text: str, labels: Sequence[str], shown: Sequence[tuple[dict[str, Any], str]],
                   chat: bool) -> tuple[list[int], list[list[int]]]:
    """The context and each label's tokens: the assistant's whole reply under the chat template, or the
    continuation of the plain-text prompt."""
    tokenizer = lm._require_tokenizer()
    request = build_prompt(lm, "classify", {"text": text, "labels": ", ".join(labels)}, shown, chat=False)
    if chat:
        pairs = [encode_reply(tokenizer, request, label, lm.stop_token_ids()) for label in labels]
    else:
        pairs = [encode_pair(tokenizer, request, " " + label) for label in labels]
    return pairs[0][0] or [prefix_token(tokenizer)], [continuation for _, continuation in pairs]


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


__all__ = ["TEMPLATES", "Classification", "ClassifierChoice", "Template", "answer", "answer_many", "build_prompt",
           "choose_format", "classify", "classify_many", "continue_text", "correct", "keywords", "summarize",
           "translate", "write_story"]
