"""Evaluation tasks: a small YAML (or JSONL) description anyone can write, checked with clear errors.

    name: sentiment
    kind: multiple_choice            # multiple_choice | generation | perplexity
    description: Is each review positive or negative?   # optional, starts every prompt
    prompt: "Review: {text}\\nSentiment:"               # fields of an item, in braces
    choices: [negative, positive]    # or choices_field: a field holding each item's own list
    answer: label                    # the field with the gold choice (its text or index) or gold answer(s)
    answer_join: ", "                # generation: a list answer is one reference, joined (e.g. keywords)
    data: data/sentiment.jsonl       # relative to this file (or `items:` inline); each item may have "split"
    metrics: [exact_match, f1]       # generation only: exact_match f1 contains bleu chrf rouge1 rouge2 rougeL
    bleu_tokenize: zh                # sacrebleu's BLEU tokenizer, when the target language needs another than 13a

Image question answering: `kind: image_qa`, items {"image", "question", "answer"} from `data: FILE.jsonl` (image
paths relative to the file) or `dataset: easy-vqa` (the `easy-vqa` package's test split), answered by an
image-to-text model and scored by exact match beside the majority answer's share.

Grounded question answering: `kind: open_domain_qa` with `corpus: FOLDER` (indexed on first use; each item names
its gold document in `source`) and `k`, scored closed-book and with retrieval; `kind: kg_qa` with `graph: FILE`
(items may carry `hops` to be scored per number of hops).

A plain JSONL file is a task too: items {"prompt", "choices", "answer"} are multiple choice, {"prompt",
"answer"} generation. A .txt file is a perplexity task over its text.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparkgpt.data.vqa import easy_vqa_records, read_records
from sparkgpt.errors import SparkGPTError
from sparkgpt.evaluate.metrics import GENERATION_METRICS
from sparkgpt.files import read_jsonl

BUNDLED_DIR = Path(__file__).parent / "tasks"
KINDS = ("multiple_choice", "generation", "perplexity", "open_domain_qa", "kg_qa", "image_qa")
_FIELDS = {"name", "kind", "description", "prompt", "choices", "choices_field", "answer", "data", "items",
           "metrics", "target_prefix", "separator", "max_new_tokens", "stop", "fewshot_split", "eval_split", "text",
           "answer_join", "corpus", "graph", "k", "bleu_tokenize", "dataset"}
DATASETS = ("easy-vqa",)  # image_qa sets read from an installed package
BLEU_TOKENIZERS = ("13a", "intl", "zh", "char", "none")  # sacrebleu's, less those that download a model


@dataclass
class Item:
    """One example: its fields, and where it came from (for error messages)."""

    fields: dict[str, Any]
    where: str


@dataclass
class Task:
    name: str
    kind: str
    source: str
    prompt: str = "{prompt}"
    answer: str = "answer"
    description: str = ""
    choices: list[str] | None = None
    choices_field: str | None = None
    items: list[Item] = field(default_factory=list)
    fewshot_items: list[Item] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    target_prefix: str = " "
    separator: str = "\n\n"
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    text_file: Path | None = None
    answer_join: str | None = None
    corpus: Path | None = None  # open_domain_qa: the documents to retrieve from
    graph: Path | None = None   # kg_qa: the triples
    k: int = 4
    bleu_tokenize: str = "13a"

    def item_choices(self, item: Item) -> list[str]:
        return self.choices if self.choices is not None else item.fields[self.choices_field]

    def gold_index(self, item: Item) -> int:
        """The index of the correct choice of a multiple-choice item."""
        gold, choices = item.fields[self.answer], self.item_choices(item)
        return gold if isinstance(gold, int) else choices.index(gold)

    def gold_answers(self, item: Item) -> list[str]:
        """The acceptable answers of a generation item."""
        gold = item.fields[self.answer]
        if isinstance(gold, str):
            return [gold]
        return [self.answer_join.join(gold)] if self.answer_join is not None else list(gold)

    def render(self, item: Item) -> str:
        return self.prompt.format(**item.fields)

    def demonstration(self, item: Item) -> str:
        """A solved example for few-shot prompts: its prompt followed by its answer."""
        if self.kind == "multiple_choice":
            solution = self.item_choices(item)[self.gold_index(item)]
        else:
            solution = self.gold_answers(item)[0]
        return self.render(item) + self.target_prefix + solution

    def context(self, item: Item, demonstrations: list[Item]) -> str:
        parts = ([self.description] if self.description else []) + [self.demonstration(d) for d in demonstrations]
        return self.separator.join([*parts, self.render(item)])


def bundled_tasks() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


def load_task(name_or_path: str | Path) -> Task:
    """A bundled task by name (see `bundled_tasks()`), or a task file: .yaml/.yml, .jsonl or .txt."""
    path = Path(name_or_path)
    if not path.exists() and (BUNDLED_DIR / f"{name_or_path}.yaml").is_file():
        path = BUNDLED_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SparkGPTError(
            f"{name_or_path}: no such task file, and not a bundled task ({', '.join(bundled_tasks())})"
        )
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return Task(name=path.stem, kind="perplexity", source=str(path), text_file=path)
    if suffix == ".jsonl":
        return _jsonl_task(path)
    if suffix in (".yaml", ".yml"):
        return _yaml_task(path)
    raise SparkGPTError(f"{path}: expected a task file ending in .yaml, .jsonl or .txt")


def _yaml_task(path: Path) -> Task:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SparkGPTError(f"{path}: not readable YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise SparkGPTError(f"{path}: expected a YAML mapping of task fields")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise SparkGPTError(f"{path}: unknown task field(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    kind = spec.get("kind", "multiple_choice")
    if kind not in KINDS:
        raise SparkGPTError(f"{path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "perplexity":
        if "text" not in spec:
            raise SparkGPTError(f"{path}: a perplexity task needs `text: FILE`")
        return Task(name=spec.get("name", path.stem), kind=kind, source=str(path), text_file=path.parent / spec["text"])
    if kind == "image_qa":
        return _image_qa_task(path, spec)
    if "data" in spec:
        items = _read_jsonl(path.parent / spec["data"])
    elif isinstance(spec.get("items"), list):
        items = [Item(fields, f"{path}: item {i + 1}") for i, fields in enumerate(spec["items"])]
    else:
        raise SparkGPTError(f"{path}: needs `data: FILE.jsonl` or an `items:` list")
    task = Task(
        name=spec.get("name", path.stem), kind=kind, source=str(path), prompt=spec.get("prompt", "{prompt}"),
        answer=spec.get("answer", "answer"), description=spec.get("description", ""), choices=spec.get("choices"),
        choices_field=spec.get("choices_field"), target_prefix=spec.get("target_prefix", " "),
        separator=spec.get("separator", "\n\n"), max_new_tokens=spec.get("max_new_tokens", 32),
        stop=spec.get("stop", ["\n"]), answer_join=spec.get("answer_join"),
        metrics=spec.get("metrics", ["accuracy", "accuracy_norm"] if kind == "multiple_choice" else ["exact_match",
                                                                                                      "f1"]),
        corpus=path.parent / spec["corpus"] if "corpus" in spec else None,
        graph=path.parent / spec["graph"] if "graph" in spec else None, k=spec.get("k", 4),
        bleu_tokenize=spec.get("bleu_tokenize", "13a"),
    )
    if task.bleu_tokenize not in BLEU_TOKENIZERS:
        raise SparkGPTError(f"{path}: bleu_tokenize {task.bleu_tokenize!r} is not one of {', '.join(BLEU_TOKENIZERS)}")
    if kind == "open_domain_qa" and (task.corpus is None or not task.corpus.exists()):
        raise SparkGPTError(f"{path}: an open_domain_qa task needs `corpus:` naming an existing folder or file")
    if kind == "kg_qa" and (task.graph is None or not task.graph.is_file()):
        raise SparkGPTError(f"{path}: a kg_qa task needs `graph:` naming an existing triples file")
    return _split_and_check(task, items, spec.get("fewshot_split", "train"), spec.get("eval_split", "test"))


def _image_qa_task(path: Path, spec: dict[str, Any]) -> Task:
    """An image_qa task: its records from a JSONL file or a named dataset, items {"image", "question", "answer"}."""
    dataset = spec.get("dataset")
    if dataset is not None and dataset not in DATASETS:
        raise SparkGPTError(f"{path}: dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    if (dataset is None) == ("data" not in spec):
        raise SparkGPTError(f"{path}: an image_qa task needs either `data: FILE.jsonl` or `dataset: easy-vqa`")
    records = easy_vqa_records("test") if dataset else read_records(path.parent / spec["data"])
    items = [Item({"image": str(r.image), "question": r.question, "answer": r.answer}, f"{path}: item {i + 1}")
             for i, r in enumerate(records)]
    task = Task(name=spec.get("name", path.stem), kind="image_qa", source=str(path), prompt="{question}",
                description=spec.get("description", ""), max_new_tokens=spec.get("max_new_tokens", 8),
                metrics=spec.get("metrics", ["exact_match"]), items=items)
    unknown = sorted(set(task.metrics) - set(GENERATION_METRICS))
    if unknown:
        raise SparkGPTError(f"{path}: unknown metric(s) {', '.join(unknown)}; known: {', '.join(GENERATION_METRICS)}")
    return task


def _jsonl_task(path: Path) -> Task:
    items = _read_jsonl(path)
    kind = "multiple_choice" if "choices" in items[0].fields else "generation"
    multiple_choice = kind == "multiple_choice"
    task = Task(name=path.stem, kind=kind, source=str(path), choices_field="choices" if multiple_choice else None,
                metrics=["accuracy", "accuracy_norm"] if multiple_choice else ["exact_match", "f1"])
    return _split_and_check(task, items, "train", "test")


def _read_jsonl(path: Path) -> list[Item]:
    return [Item(fields, f"{path}:{number}") for number, fields in read_jsonl(path)]


def _split_and_check(task: Task, items: list[Item], fewshot_split: str, eval_split: str) -> Task:
    """Every item must render and carry a valid answer: one bad item is an error naming it, before any work."""
    if task.kind != "multiple_choice":
        unknown = sorted(set(task.metrics) - set(GENERATION_METRICS))
        if unknown:
            raise SparkGPTError(f"{task.source}: unknown metric(s) {', '.join(unknown)}; "
                                f"known: {', '.join(GENERATION_METRICS)}")
    elif task.choices is None and task.choices_field is None:
        raise SparkGPTError(f"{task.source}: a multiple-choice task needs `choices` or `choices_field`")
    prompt_fields = {name for _, name, _, _ in string.Formatter().parse(task.prompt) if name}
    for item in items:
        _check_item(task, item, prompt_fields)
    has_splits = any("split" in item.fields for item in items)
    task.items = [i for i in items if i.fields.get("split") == eval_split] if has_splits else items
    task.fewshot_items = [i for i in items if i.fields.get("split") == fewshot_split] if has_splits else []
    if not task.items:
        raise SparkGPTError(f"{task.source}: no items in the {eval_split!r} split")
    return task


def _check_item(task: Task, item: Item, prompt_fields: set[str]) -> None:
    missing = sorted(prompt_fields - set(item.fields))
    if missing:
        raise SparkGPTError(f"{item.where}: item has no field {missing[0]!r}, which the prompt uses")
    if task.answer not in item.fields:
        raise SparkGPTError(f"{item.where}: item has no answer field {task.answer!r}")
    gold = item.fields[task.answer]
    if task.kind == "multiple_choice":
        choices = task.choices if task.choices is not None else item.fields.get(task.choices_field)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise SparkGPTError(f"{item.where}: choices must be a list of at least two strings")
        valid = (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)) or gold in choices
        if not valid:
            raise SparkGPTError(f"{item.where}: answer {gold!r} is not one of the choices {choices}")
    elif not (isinstance(gold, str) or (isinstance(gold, list) and gold and all(isinstance(g, str) for g in gold))):
        raise SparkGPTError(f"{item.where}: answer must be a string or a non-empty list of strings")
