"""Metrics for generated text, each computed as its reference implementation defines it.

Exact match and token F1 use SQuAD's answer normalisation; BLEU and chrF are sacrebleu's corpus scores;
ROUGE is rouge-score's F-measure. Every function takes predictions and, per prediction, one or more references,
and returns a score on a 0-100 scale.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Sequence

from sparkgpt.errors import SparkGPTError

References = Sequence[Sequence[str]]


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: References) -> float:
    hits = [max(normalize_answer(p) == normalize_answer(r) for r in refs) for p, refs in _pairs(predictions,
                                                                                                   references)]
    return 100.0 * sum(hits) / len(hits)


def f1(predictions: Sequence[str], references: References) -> float:
    scores = [max(token_f1(p, r) for r in refs) for p, refs in _pairs(predictions, references)]
    return 100.0 * sum(scores) / len(scores)


def contains(predictions: Sequence[str], references: References) -> float:
    """Whether the prediction contains a reference (both normalised): the score of a right answer in a sentence."""
    hits = [any(normalize_answer(r) and f" {normalize_answer(r)} " in f" {normalize_answer(p)} " for r in refs)
            for p, refs in _pairs(predictions, references)]
    return 100.0 * sum(hits) / len(hits)


def bleu(predictions: Sequence[str], references: References, tokenize: str = "13a") -> float:
    """`tokenize` is sacrebleu's word splitter: its default 13a, or "zh" for Chinese (one word per character)."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), _reference_streams(references), tokenize=tokenize).score


def chrf(predictions: Sequence[str], references: References) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score


def _rouge(kind: str) -> Callable[[Sequence[str], References], float]:
    def score(predictions: Sequence[str], references: References) -> float:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
        values = [max(scorer.score(r, p)[kind].fmeasure for r in refs) for p, refs in _pairs(predictions,
                                                                                             references)]
        return 100.0 * sum(values) / len(values)

    score.__name__ = kind
    return score


GENERATION_METRICS: dict[str, Callable[[Sequence[str], References], float]] = {
    "exact_match": exact_match, "f1": f1, "contains": contains, "bleu": bleu, "chrf": chrf,
    "rouge1": _rouge("rouge1"), "rouge2": _rouge("rouge2"), "rougeL": _rouge("rougeL"),
}


def _pairs(predictions: Sequence[str], references: References) -> list[tuple[str, Sequence[str]]]:
    if len(predictions) != len(references) or not predictions:
        raise SparkGPTError(f"metrics need one reference list per prediction ({len(predictions)} predictions, "
                            f"{len(references)} references)")
    return list(zip(predictions, references, strict=True))


def _reference_streams(references: References) -> list[list[str]]:
    """sacrebleu wants one stream per reference slot; items with fewer references repeat their first."""
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
