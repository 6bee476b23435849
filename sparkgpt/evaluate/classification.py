"""Accuracy and confusion matrix of a fine-tuned classification head on a labeled JSONL file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparkgpt.data.examples import labeled
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_jsonl
from sparkgpt.lm import LM


@dataclass
class ClassificationReport:
    labels: list[str]
    accuracy: float
    confusion: list[list[int]]  # confusion[true][predicted], in `labels` order
    count: int


def classification_report(lm: LM, path: str | Path, batch_size: int = 16) -> ClassificationReport:
    """Predict every {"text", "label"} record of `path` and compare with its label."""
    path = Path(path)
    records = [(*labeled(record, f"{path}:{number}"), number) for number, record in read_jsonl(path)]
    predictions = lm.classify([text for text, _, _ in records], batch_size=batch_size)
    labels = list(next(iter(predictions)))
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for (_, label, number), probabilities in zip(records, predictions, strict=True):
        if label not in index:
            raise SparkGPTError(f"{path}:{number}: label {label!r} is not one the model knows ({', '.join(labels)})")
        confusion[index[label]][index[max(probabilities, key=probabilities.get)]] += 1
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return ClassificationReport(labels, correct / len(records), confusion, len(records))


def format_report(report: ClassificationReport) -> str:
    """Accuracy, then the confusion matrix: a row per true label, a column per predicted label."""
    width = max(8, *(len(label) + 2 for label in report.labels))
    lines = [f"accuracy {report.accuracy:.3f} ({round(report.accuracy * report.count)}/{report.count})",
             "true \\ predicted".ljust(width + 8) + "".join(label.rjust(width) for label in report.labels)]
    for label, row in zip(report.labels, report.confusion, strict=True):
        lines.append(label.ljust(width + 8) + "".join(str(count).rjust(width) for count in row))
    return "\n".join(lines)
