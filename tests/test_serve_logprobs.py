"""Log-probabilities from the server: chat's `logprobs`/`top_logprobs`, the legacy `logprobs` and `echo` (prompt
scoring, max_tokens 0 included), each equal to an in-process forward, streamed as not, and lm-evaluation-harness's
`local-completions` model scoring a bundled task through the server as our own harness does in-process."""

from __future__ import annotations

import json
import math
import queue
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import sparkgpt
from sparkgpt import LM, SamplingParams
from sparkgpt.evaluate.harness import evaluate
from sparkgpt.evaluate.task import load_task
from sparkgpt.serve.engine import Engine
from sparkgpt.serve.protocol import token_bytes, token_text
from tests.test_serve import (  # noqa: F401  (one_torch_thread: an autouse fixture; tiny_checkpoint: a fixture)
    API_KEY,
    MODEL,
    USER,
    Server,
    one_torch_thread,
    tiny_checkpoint,
)

TOLERANCE = 1e-4
PROMPT = "To be, or not to be, that is the question"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> LM:  # noqa: F811 (the fixture imported above)
    return sparkgpt.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    server = Server(tiny_checkpoint, "--api-key", API_KEY, "--model-name", MODEL,
                    log=tmp_path_factory.mktemp("logs") / "server.log")
    yield server
    server.close()


def forward_logprobs(lm: LM, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of `ids`, [len(ids), vocab], in one plain forward."""
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids]))[0].float(), dim=-1)


def greedy(lm: LM, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(forward_logprobs(lm, ids)[-1].argmax()))
    return ids[len(prompt):]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, abs_tol=TOLERANCE)


# ---- the engine alone -------------------------------------------------------------------------------------------


def test_engine_scores_prompts_across_prefill_chunks_beside_rows_that_ask_nothing(reference: LM):
    """Prompt and sampled logprobs from chunked prefills (4 tokens an iteration) and batched decode steps, with a
    request that asks for none in the same batches, equal one plain forward; the quiet request is unchanged."""
    prompts = [reference.encode(PROMPT), reference.encode("The quick brown fox"), reference.encode("x y")]
    asks = [(2, 2, False), (None, None, False), (0, 3, True)]  # (logprobs, prompt_logprobs, score_only)
    engine = Engine(reference, max_slots=3, context=128, prefill_chunk=4)
    sinks: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in prompts]
    for prompt, (logprobs, prompt_logprobs, score_only), sink in zip(prompts, asks, sinks, strict=True):
        engine.submit(prompt, SamplingParams(max_new_tokens=6, temperature=0), sink.put, logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs, score_only=score_only)
    engine.start()
    try:
        results = []
        for sink in sinks:
            events, done = [], False
            while not done:
                for event in sink.get(timeout=60):
                    assert event.error is None
                    events.append(event)
                    done = event.finish_reason is not None
            results.append(events)
    finally:
        engine.stop()

    scored, quiet, score_only = results
    generated = [entry.token for event in scored for entry in event.logprobs]
    assert generated == greedy(reference, prompts[0], 6)
    expected = forward_logprobs(reference, prompts[0] + generated)
    prompt_entries = scored[0].prompt_logprobs
    assert prompt_entries[0] is None and len(prompt_entries) == len(prompts[0])
    for position, entry in enumerate(prompt_entries[1:], start=1):
        assert entry.token == prompts[0][position]
        assert close(entry.logprob, float(expected[position - 1, entry.token]))
        assert [token for token, _ in entry.top] == expected[position - 1].topk(2).indices.tolist()
    for step, entry in enumerate(entry for event in scored for entry in event.logprobs):
        assert close(entry.logprob, float(expected[len(prompts[0]) + step - 1, entry.token]))
    assert all(not event.logprobs and event.prompt_logprobs is None for event in quiet)
    assert "".join(event.text for event in quiet) == reference.tokenizer.decode(greedy(reference, prompts[1], 6))
    assert len(score_only) == 1 and score_only[0].finish_reason == "length" and score_only[0].completion_tokens == 0
    expected = forward_logprobs(reference, prompts[2])
    assert [close(entry.logprob, float(expected[i, entry.token]))
            for i, entry in enumerate(score_only[0].prompt_logprobs[1:])] == [True] * (len(prompts[2]) - 1)


# ---- the server, through the official client ---------------------------------------------------------------------


def test_chat_logprobs_equal_an_in_process_forward_with_sorted_top_logprobs(server: Server, reference: LM):
    reply = server.client().chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0,
                                                    logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    prompt = reference.chat_prompt(USER)
    tokens = greedy(reference, prompt, 8)
    expected = forward_logprobs(reference, prompt + tokens)
    assert len(content) == 8
    # A random model's tokens may split characters: the bytes of all of them together are the text.
    text = b"".join(bytes(entry.bytes) for entry in content).decode(errors="replace")
    assert text == reply.choices[0].message.content
    for step, (entry, token) in enumerate(zip(content, tokens, strict=True)):
        row = expected[len(prompt) + step - 1]
        assert entry.bytes == list(token_bytes(reference.tokenizer, token))
        assert close(entry.logprob, float(row[token]))
        top = [alternative.logprob for alternative in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert all(close(ours, float(theirs)) for ours, theirs in zip(top, row.topk(3).values, strict=True))
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob


def test_completion_logprobs_equal_an_in_process_forward(server: Server, reference: LM):
    reply = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    prompt = reference.encode(PROMPT)
    tokens = greedy(reference, prompt, 8)
    expected = forward_logprobs(reference, prompt + tokens)
    assert logprobs.tokens == [token_text(reference.tokenizer, token) for token in tokens]
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(8)]
    for step, (token, logprob, top) in enumerate(zip(tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                                                     strict=True)):
        row = expected[len(prompt) + step - 1]
        assert close(logprob, float(row[token]))
        assert len(top) == 2 and max(top.values()) == logprob  # greedy: the sampled token is the likeliest
        assert sorted(top.values(), reverse=True) == list(top.values())


def test_streamed_logprobs_equal_non_streamed_at_temperature_zero(server: Server):
    client = server.client()
    chat = dict(model=MODEL, messages=USER, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(**chat, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [entry.token for entry in streamed] == [entry.token for entry in whole]
    assert all(close(a.logprob, b.logprob) for a, b in zip(streamed, whole, strict=True))

    completion = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**completion).choices[0]
    chunks = [chunk.choices[0] for chunk in client.completions.create(**completion, stream=True) if chunk.choices]
    assert "".join(chunk.text for chunk in chunks) == whole.text
    tokens = [token for chunk in chunks if chunk.logprobs for token in chunk.logprobs.tokens]
    values = [value for chunk in chunks if chunk.logprobs for value in chunk.logprobs.token_logprobs]
    offsets = [offset for chunk in chunks if chunk.logprobs for offset in chunk.logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert values[0] is None and whole.logprobs.token_logprobs[0] is None
    assert all(close(a, b) for a, b in zip(values[1:], whole.logprobs.token_logprobs[1:], strict=True))


@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token-ids"])
def test_echo_with_max_tokens_zero_returns_the_prompt_scored_by_an_in_process_forward(
        server: Server, reference: LM, as_ids: bool):
    ids = reference.encode(PROMPT)
    reply = server.client().completions.create(model=MODEL, prompt=ids if as_ids else PROMPT, max_tokens=0,
                                               echo=True, logprobs=1, temperature=0)
    choice = reply.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)
    expected = forward_logprobs(reference, ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert len(choice.logprobs.token_logprobs) == len(ids)
    for position, logprob in enumerate(choice.logprobs.token_logprobs[1:], start=1):
        assert close(logprob, float(expected[position - 1, ids[position]]))
    unscored = server.client().completions.create(model=MODEL, prompt=ids if as_ids else PROMPT, max_tokens=0,
                                                  echo=True)
    assert unscored.choices[0].text == PROMPT and unscored.choices[0].logprobs is None


def bad_logprob_requests() -> list:
    chat = dict(model=MODEL, messages=USER, max_tokens=2)
    completion = dict(model=MODEL, prompt=PROMPT, max_tokens=2)
    return [
        pytest.param("chat", dict(chat, logprobs=True, top_logprobs=21), "top_logprobs", id="top_logprobs=21"),
        pytest.param("chat", dict(chat, top_logprobs=2), "top_logprobs", id="top_logprobs-without-logprobs"),
        pytest.param("chat", dict(chat, logprobs=2), "logprobs", id="chat-logprobs-int"),
        pytest.param("completions", dict(completion, logprobs=6), "logprobs", id="logprobs=6"),
        pytest.param("completions", dict(completion, logprobs=-1), "logprobs", id="logprobs=-1"),
        pytest.param("completions", dict(completion, echo="yes"), "echo", id="echo-str"),
        pytest.param("completions", dict(completion, max_tokens=0), "max_tokens", id="max_tokens=0-without-echo"),
    ]


@pytest.mark.parametrize(("route", "body", "param"), bad_logprob_requests())
def test_out_of_range_logprob_fields_are_400s_naming_the_field(server: Server, route: str, body: dict, param: str):
    path = "chat/completions" if route == "chat" else "completions"
    response = httpx.post(f"{server.url}/v1/{path}", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


# ---- lm-evaluation-harness through the server ----------------------------------------------------------------------

LM_EVAL_TASK = """task: served_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: ["negative", "positive"]
doc_to_target: "{{{{['negative', 'positive'].index(label)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_local_completions_through_the_server_equals_our_harness(
        server: Server, reference: LM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """lm-eval's `local-completions` scores the bundled sentiment task's first 20 items through /v1/completions
    (echo, logprobs), tokenizing with a local copy of the served tokenizer; the accuracies equal `evaluate`'s."""
    lm_eval = pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    task = load_task("sentiment")
    data = tmp_path / "sentiment.jsonl"  # each item with its prompt as our harness writes it (description first)
    data.write_text("".join(json.dumps({**item.fields, "context": task.context(item, [])}) + "\n"
                            for item in task.items[:20]))
    (tmp_path / "served_sentiment.yaml").write_text(LM_EVAL_TASK.format(data=data))
    transformers.PreTrainedTokenizerFast(tokenizer_object=reference.tokenizer.backend).save_pretrained(
        tmp_path / "tokenizer")
    model_args = (f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={tmp_path / 'tokenizer'},tokenized_requests=True,max_retries=1")
    results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=["served_sentiment"],
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    theirs = results["results"]["served_sentiment"]
    report = evaluate(reference, task, limit=20, chat=False, progress=False)
    assert math.isclose(theirs["acc,none"] * 100, report.metrics["accuracy"])
    assert math.isclose(theirs["acc_norm,none"] * 100, report.metrics["accuracy_norm"])
    # Not only the accuracies: every choice's log-likelihood, from the server's echoed prompt logprobs.
    samples = sorted(results["samples"]["served_sentiment"], key=lambda sample: sample["doc_id"])
    served = [[float(response[0][0]) for response in sample["resps"]] for sample in samples]
    assert len(served) == 20
    for theirs_item, ours_item in zip(served, (sample["logprobs"] for sample in report.samples), strict=True):
        assert all(close(a, b) for a, b in zip(theirs_item, ours_item, strict=True))
