"""Run a task on a model: few-shot prompts, scoring or generation, metrics, and a report."""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sparkgpt.errors import SparkGPTError
from sparkgpt.evaluate.loglik import (
    bits_per_byte,
    encode_pair,
    encode_reply,
    perplexity,
    prefix_token,
    score_batch,
    score_text,
)
from sparkgpt.evaluate.metrics import GENERATION_METRICS, contains
from sparkgpt.evaluate.task import Item, Task, load_task
from sparkgpt.files import cache_dir, write_json
from sparkgpt.lm import LM
from sparkgpt.rag.graph import KnowledgeGraph
from sparkgpt.rag.index import Embedder, Index
from sparkgpt.tasks.grounded import uncited
from sparkgpt.tasks.prompted import answer, answer_many


@dataclass
class Report:
    task: str
    kind: str
    shots: int
    n_items: int
    metrics: dict[str, float]
    seconds: float
    chat_template: bool
    samples: list[dict[str, Any]] = field(default_factory=list)
    format_accuracy: dict[str, float] = field(default_factory=dict)  # plain / chat, when auto chose between them

    @property
    def items_per_second(self) -> float:
        return self.n_items / self.seconds if self.seconds else float("nan")

    def table(self) -> str:
        lines = [f"{self.task} ({self.kind}, {self.shots}-shot, {self.n_items} items, "
                 f"{self.items_per_second:.1f} items/s)"]
        if self.format_accuracy:
            scores = ", ".join(f"{name} {value:.1f}" for name, value in self.format_accuracy.items())
            lines.append(f"  {'chat template' if self.chat_template else 'plain prompts'}, chosen by leave-one-out "
                         f"accuracy on the few-shot items ({scores})")
        width = max(16, *(len(name) + 2 for name in self.metrics))
        lines += [f"  {name:<{width}}{value:>10.2f}" for name, value in self.metrics.items()]
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        write_json(Path(path), {**asdict(self), "items_per_second": self.items_per_second})


def evaluate(
    lm: LM, task: Task | str | Path, shots: int = 0, limit: int | None = None, seed: int = 1234,
    chat: bool | None = None, batch_size: int = 8, progress: bool = True,
) -> Report:
    """Score `lm` on `task`. `chat`: True wraps each prompt in the model's chat template as the user's turn, a
    choice being scored as the assistant's whole reply; False keeps plain text, as lm-evaluation-harness writes
    it. None (auto): multiple choice takes whichever of the two is more accurate on the task's few-shot items
    (`Report.format_accuracy`); generation keeps plain text; grounded QA takes the template of a chat model."""
    task = task if isinstance(task, Task) else load_task(task)
    lm._require_tokenizer()
    start = time.perf_counter()
    if task.kind == "perplexity":
        return _perplexity(lm, task, start)
    if task.kind == "image_qa":
        if shots:
            raise SparkGPTError(f"{task.source}: an image_qa task is answered zero-shot (one image per question); "
                                f"got {shots} shots")
        return _image_qa(lm, task, task.items[:limit] if limit else task.items, batch_size, progress, start)
    if shots > len(task.fewshot_items):
        raise SparkGPTError(f"{task.source}: {shots} shots asked, but the few-shot split has "
                            f"{len(task.fewshot_items)} items")
    items = task.items[:limit] if limit else task.items
    format_accuracy: dict[str, float] = {}
    if chat is not None:
        use_chat = lm.uses_chat_template(chat)
    elif task.kind == "multiple_choice":
        use_chat, format_accuracy = _choose_chat(lm, task, shots, seed, batch_size)
    else:
        use_chat = task.kind in ("open_domain_qa", "kg_qa") and lm.uses_chat_template()  # answers are requests
    if task.kind in ("open_domain_qa", "kg_qa"):
        bar = tqdm(total=len(items), desc=task.name, disable=not progress, unit="item")
        grounded = _open_domain_qa if task.kind == "open_domain_qa" else _kg_qa
        metrics, samples = grounded(lm, task, items, use_chat, batch_size, bar, progress)
        bar.close()
        return Report(task.name, task.kind, 0, len(items), metrics, time.perf_counter() - start, use_chat, samples)
    requests = [task.context(item, _demonstrations(task, index, shots, seed)) for index, item in enumerate(items)]
    bar = tqdm(total=len(items), desc=task.name, disable=not progress, unit="item")
    if task.kind == "multiple_choice":
        metrics, samples = _multiple_choice(lm, task, items, requests, use_chat, batch_size, bar)
    else:
        contexts = [lm.instruction_prompt(request, use_chat) for request in requests]
        metrics, samples = _generation(lm, task, items, contexts, batch_size, bar)
    bar.close()
    return Report(task.name, task.kind, shots, len(items), metrics, time.perf_counter() - start, use_chat, samples,
                  format_accuracy)


def _choose_chat(lm: LM, task: Task, shots: int, seed: int, batch_size: int) -> tuple[bool, dict[str, float]]:
    """Auto for multiple choice: plain text or the chat template, whichever is more accurate on the task's
    few-shot items, each scored with `shots` demonstrations drawn from the others (leave-one-out); plain text on
    a tie, as `tasks.classify` chooses (a bare choice is an unlikely whole reply from a chat model)."""
    labelled = task.fewshot_items
    if not lm.uses_chat_template() or len(labelled) <= shots:
        return False, {}
    requests = [task.context(item, random.Random(f"{seed}:{index}").sample(labelled[:index] + labelled[index + 1:],
                                                                            shots) if shots else [])
                for index, item in enumerate(labelled)]
    quiet = tqdm(disable=True)
    accuracy = {name: _multiple_choice(lm, task, labelled, requests, use_chat, batch_size, quiet)[0]["accuracy"]
                for name, use_chat in (("plain", False), ("chat", True))}
    return accuracy["chat"] > accuracy["plain"], accuracy


def _demonstrations(task: Task, index: int, shots: int, seed: int) -> list[Item]:
    """The same items for the same (seed, item) on every run and machine."""
    return random.Random(f"{seed}:{index}").sample(task.fewshot_items, shots) if shots else []


def _multiple_choice(lm, task, items, requests, use_chat, batch_size, bar) -> tuple[dict[str, float], list[dict]]:
    """Each item's choices scored after its prompt: as the plain-text continuation, or with the chat template as
    the assistant's whole reply (no separating space, and its end-of-turn token)."""
    correct = correct_norm = 0
    samples = []
    prefix = "" if use_chat else task.target_prefix
    stop_ids = lm.stop_token_ids()
    for batch in _chunks(list(zip(items, requests, strict=True)), batch_size):
        scoring = []
        for item, request in batch:
            pairs = [encode_reply(lm.tokenizer, request, choice, stop_ids) if use_chat
                     else encode_pair(lm.tokenizer, request, prefix + choice) for choice in task.item_choices(item)]
            scoring.append((pairs[0][0] or [prefix_token(lm.tokenizer)], [continuation for _, continuation in pairs]))
        for (item, _), scores in zip(batch, score_batch(lm.model, scoring), strict=True):
            choices = task.item_choices(item)
            logprobs = [s.logprob for s in scores]
            normalised = [s.logprob / len(prefix + c) for s, c in zip(scores, choices, strict=True)]
            best, best_norm, gold = _argmax(logprobs), _argmax(normalised), task.gold_index(item)
            correct += best == gold
            correct_norm += best_norm == gold
            samples.append({"where": item.where, "gold": choices[gold], "predicted": choices[best],
                            "logprobs": logprobs})
        bar.update(len(batch))
    return {"accuracy": 100.0 * correct / len(items), "accuracy_norm": 100.0 * correct_norm / len(items)}, samples


def _generation(lm, task, items, contexts, batch_size, bar) -> tuple[dict[str, float], list[dict[str, Any]]]:
    predictions = []
    for batch in _chunks(contexts, batch_size):
        ids = [lm.tokenizer.encode(c, add_special_tokens=False) for c in batch]
        completions = lm.complete(ids, max_new_tokens=task.max_new_tokens, temperature=0, stop=task.stop or ())
        predictions += [c.text.strip() for c in completions]
        bar.update(len(batch))
    references = [task.gold_answers(item) for item in items]
    options = {"bleu": {"tokenize": task.bleu_tokenize}}
    metrics = {name: GENERATION_METRICS[name](predictions, references, **options.get(name, {}))
               for name in task.metrics}
    samples = [{"where": item.where, "gold": refs, "predicted": p}
               for item, refs, p in zip(items, references, predictions, strict=True)]
    return metrics, samples


def _open_domain_qa(lm, task, items, use_chat, batch_size, bar, progress) -> tuple[dict[str, float], list[dict]]:
    """Each question closed-book and grounded in the task's corpus (indexed once into the cache folder, updated
    when the corpus changes): the answer metrics of both, and recall@k of the gold document."""
    corpus = task.corpus.resolve()
    key = hashlib.sha256(str(corpus).encode()).hexdigest()[:16]
    index = Index.build([corpus], cache_dir() / "indexes" / f"{task.name}-{key}", progress=progress)
    questions = [task.render(item) for item in items]
    references = [task.gold_answers(item) for item in items]
    settings = {"max_new_tokens": task.max_new_tokens, "chat": use_chat, "batch_size": batch_size}
    closed, grounded = [], []
    for start in range(0, len(items), batch_size):
        batch = questions[start:start + batch_size]
        closed += answer_many(lm, batch, **settings)
        grounded += answer_many(lm, batch, index=index, k=task.k, **settings)
        bar.update(len(batch))
    found = [any(_is_source(hit.chunk.source, corpus, item.fields.get("source")) for hit in answer.sources)
             for item, answer in zip(items, grounded, strict=True)]
    closed_text = [a.answer for a in closed]
    grounded_text = [uncited(a.answer) for a in grounded]
    metrics = {f"closed_book_{name}": GENERATION_METRICS[name](closed_text, references) for name in task.metrics}
    metrics |= {f"retrieval_{name}": GENERATION_METRICS[name](grounded_text, references) for name in task.metrics}
    metrics[f"recall@{task.k}"] = 100.0 * sum(found) / len(found)
    samples = [{"where": item.where, "gold": refs, "closed_book": c, "retrieval": g.answer, "gold_retrieved": hit,
                "sources": [h.chunk.source for h in g.sources]}
               for item, refs, c, g, hit in zip(items, references, closed_text, grounded, found, strict=True)]
    return metrics, samples


def _is_source(source: str, corpus: Path, gold: str | None) -> bool:
    """Whether a chunk's source (a path, or `path#id`) is the gold document, named relative to the corpus."""
    if gold is None:
        return False
    path, _, record = source.partition("#")
    relative = Path(path).resolve().relative_to(corpus).as_posix() if corpus.is_dir() else Path(path).name
    return (relative + (f"#{record}" if record else "")) == gold


def _kg_qa(lm, task, items, use_chat, batch_size, bar, progress) -> tuple[dict[str, float], list[dict]]:
    """Accuracy of graph-grounded answers (an answer is right when it holds a gold answer; for a question about an
    unknown entity, gold "unknown", when it says it does not know), overall and per number of hops."""
    graph = KnowledgeGraph.load(task.graph, embedder=Embedder.load())
    samples, right = [], []
    for item in items:
        reply = answer(lm, task.render(item), graph=graph, chat=use_chat, max_new_tokens=task.max_new_tokens)
        gold = task.gold_answers(item)
        if [g.lower() for g in gold] == ["unknown"]:
            correct = reply.answer.startswith("I don't know")
        else:
            correct = contains([reply.answer], [gold]) == 100.0
        right.append(correct)
        samples.append({"where": item.where, "gold": gold, "predicted": reply.answer, "facts": reply.facts,
                        "hops": item.fields.get("hops"), "correct": correct})
        bar.update(1)
    metrics = {"accuracy": 100.0 * sum(right) / len(right)}
    names = {0: "unknown_entity", 1: "one_hop", 2: "two_hop"}
    for hops in sorted({s["hops"] for s in samples if isinstance(s["hops"], int)}):
        chosen = [s["correct"] for s in samples if s["hops"] == hops]
        metrics[f"accuracy_{names.get(hops, f'{hops}_hops')}"] = 100.0 * sum(chosen) / len(chosen)
    return metrics, samples


def _image_qa(lm: LM, task: Task, items: list[Item], batch_size: int, progress: bool, start: float) -> Report:
    """Each question answered greedily about its image (the chat template's prompt), scored by the task's
    metrics; `majority_answer` is the share of the most common gold answer, what a model blind to the images
    reaches at best by always giving it. Questions go in batches of one prompt length (the decoder's rows
    start together)."""
    prompts = [lm.chat_prompt([{"role": "user", "content": item.fields["question"]}]) for item in items]
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    predictions = [""] * len(items)
    bar = tqdm(total=len(items), desc=task.name, disable=not progress, unit="item")
    for indices in by_length.values():
        for batch in _chunks(indices, batch_size):
            completions = lm.complete([prompts[i] for i in batch], [items[i].fields["image"] for i in batch],
                                      max_new_tokens=task.max_new_tokens, temperature=0, stop=task.stop or ())
            for i, completion in zip(batch, completions, strict=True):
                predictions[i] = completion.text.strip()
            bar.update(len(batch))
    bar.close()
    references = [task.gold_answers(item) for item in items]
    metrics = {name: GENERATION_METRICS[name](predictions, references) for name in task.metrics}
    majority = Counter(refs[0] for refs in references).most_common(1)[0][1]
    metrics["majority_answer"] = 100.0 * majority / len(items)
    samples = [{"where": item.where, "image": item.fields["image"], "question": item.fields["question"],
                "gold": refs, "predicted": p} for item, refs, p in zip(items, references, predictions, strict=True)]
    return Report(task.name, task.kind, 0, len(items), metrics, time.perf_counter() - start, True, samples)


def _perplexity(lm: LM, task: Task, start: float) -> Report:
    try:
        text = task.text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SparkGPTError(f"{task.text_file}: not readable UTF-8 text ({error})") from None
    if not text:
        raise SparkGPTError(f"{task.text_file}: empty text")
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    total = score_text(lm.model, ids, prefix_token(lm.tokenizer))
    metrics = {"perplexity": perplexity(total, len(ids)), "bits_per_byte": bits_per_byte(total, len(text.encode())),
               "tokens": float(len(ids))}
    return Report(task.name, task.kind, 0, 1, metrics, time.perf_counter() - start, False)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _chunks(values: list, size: int) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start:start + size]

