"""Isolation and fairness in generation and serving: a request's numerical failure ends that request alone,
temperatures below vLLM's epsilon are greedy, stop strings are matched in linear time, admission is fair by
sequences with a cap on queued work, the samplers users expect (presence/frequency penalties, logit_bias, min_p),
and a supervised engine thread (/health 503 once it died)."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import time
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serve import API_KEY, one_torch_thread, tiny_lm  # noqa: F401  (one_torch_thread: an autouse fixture)

from sparkgpt import SamplingParams, Tokenizer
from sparkgpt import generate as generation
from sparkgpt.generate import FLOAT32_TINY, NonFiniteLogits, Sampler, SamplingParamError, StreamText
from sparkgpt.serve.engine import Engine, QueueFull

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) if the block runs longer than `seconds`: a quadratic loop must not hang the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def wait_for(condition, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def drain(sink: queue.SimpleQueue, timeout: float = 60) -> tuple[str, str | None, str | None]:
    """(text, finish reason, error code) of a one-choice request's events."""
    text = ""
    while True:
        for event in sink.get(timeout=timeout):
            if event.error is not None:
                return text, None, event.code
            text += event.text
            if event.finish_reason is not None:
                return text, event.finish_reason, None


# ---- sampling parameters and the sampler ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300), dict(repetition_penalty=1e-39),
    dict(repetition_penalty=float("inf")), dict(presence_penalty=2.5), dict(frequency_penalty=-3),
    dict(min_p=1.5), dict(min_p=-0.1), dict(logit_bias={3: 101}), dict(logit_bias={-1: 1}),
    dict(logit_bias={"3": 1}),
])
def test_sampling_values_that_would_break_float32_or_leave_openai_ranges_are_refused(bad):
    name = next(iter(bad))
    with pytest.raises(SamplingParamError, match=name) as caught:
        SamplingParams(**bad)
    assert caught.value.field == name


def test_temperature_below_vllm_epsilon_is_greedy(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=64)
    greedy = lm.generate("To be, or not", max_new_tokens=12, temperature=0)
    for temperature in (1e-40, 1e-6):
        assert lm.generate("To be, or not", max_new_tokens=12, temperature=temperature, seed=1) == greedy
    sampler = Sampler(1, 50)
    sampler.start(0, SamplingParams(temperature=1e-40))
    logits = torch.randn(1, 50) * 30
    assert int(sampler.sample(logits)[0]) == int(logits.argmax())


def test_a_row_whose_logits_are_not_finite_fails_alone_and_the_others_draw_as_alone():
    torch.manual_seed(0)
    vocab = 200
    rows = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.8, top_p=0.9),
            SamplingParams(temperature=0), SamplingParams(temperature=1.0, repetition_penalty=FLOAT32_TINY),
            SamplingParams(temperature=0), SamplingParams(temperature=1.0, repetition_penalty=1.3, min_p=0.05)]
    seeds = [1, 2, None, 4, None, 6]
    contexts = [[5, 6], [7], [], [9], [], [11, 12]]
    logits = torch.randn(len(rows), vocab) * 3
    logits[1, 17] = float("nan")          # a sampled row with a NaN
    logits[3, 9] = 50.0                   # 50 / 1.2e-38 overflows float32: +inf
    logits[4] = float("-inf")             # a greedy row with nothing left
    together = Sampler(len(rows), vocab)
    for row, (params, seed, context) in enumerate(zip(rows, seeds, contexts, strict=True)):
        together.start(row, params, seed, context)
    picks = together.sample(logits).tolist()
    assert [picks[1], picks[3], picks[4]] == [generation.FAILED] * 3
    for row in (0, 2, 5):
        alone = Sampler(1, vocab)
        alone.start(0, rows[row], seeds[row], contexts[row])
        assert int(alone.sample(logits[row:row + 1])[0]) == picks[row]
    # token_steps (LM.generate) raises, naming the row, instead of emitting garbage.


def test_lm_generate_raises_naming_the_row_whose_logits_are_nan(tokenizer: Tokenizer, monkeypatch):
    lm = tiny_lm(tokenizer, max_seq_len=64)
    first = generation._DecoderOnly.first

    def blown_up(runner):  # the second prompt's numbers blow up
        logits = first(runner)
        logits[1] = float("nan")
        return logits

    monkeypatch.setattr(generation._DecoderOnly, "first", blown_up)
    with pytest.raises(NonFiniteLogits) as caught:
        lm.complete([[1, 2, 3], [6, 5]], max_new_tokens=3, temperature=0)
    assert caught.value.rows == [1]


def test_presence_and_frequency_penalties_follow_openai_formula_over_generated_tokens_only():
    torch.manual_seed(0)
    vocab, steps = 40, 12
    logits = torch.randn(1, vocab)
    params = SamplingParams(temperature=0, frequency_penalty=0.7, presence_penalty=0.4)
    sampler = Sampler(1, vocab)
    sampler.start(0, params, context=[int(logits.argmax())])  # the prompt's tokens are not penalised
    counts = torch.zeros(1, vocab)
    for _ in range(steps):
        expected = logits - counts * 0.7 - (counts > 0).float() * 0.4  # OpenAI's definition
        token = int(sampler.sample(logits)[0])
        assert token == int(expected.argmax())
        counts[0, token] += 1
    assert (counts > 0).sum() > 1  # the penalty moved the choice on
    penalised = generation.process_logits(logits, SamplingParams(temperature=0, frequency_penalty=-1.5,
                                                                 presence_penalty=2.0), None, counts)
    torch.testing.assert_close(penalised, logits + counts * 1.5 - (counts > 0) * 2.0)


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_equals_transformers_min_p_warper(min_p):
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 500) * 3
    expected = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
    actual = generation.filter_logits(logits, SamplingParams(temperature=0.7, min_p=min_p))
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite])


def test_new_samplers_batched_each_draw_as_alone():
    torch.manual_seed(0)
    vocab, steps = 300, 8
    rows = [SamplingParams(temperature=0.9, min_p=0.1), SamplingParams(temperature=0.9, frequency_penalty=1.5),
            SamplingParams(temperature=0, presence_penalty=2.0, logit_bias={3: 5.0, 4: -100}),
            SamplingParams(temperature=1.1, top_k=20), SamplingParams(temperature=0.9, min_p=0.1,
                                                                     logit_bias={7: 3.0})]
    seeds = [1, 2, None, 4, 5]
    logits = [torch.randn(len(rows), vocab) * 2 for _ in range(steps)]
    together = Sampler(len(rows), vocab)
    for row, (params, seed) in enumerate(zip(rows, seeds, strict=True)):
        together.start(row, params, seed, [1, 2])
    picks = torch.stack([together.sample(step) for step in logits], dim=1)
    for row, (params, seed) in enumerate(zip(rows, seeds, strict=True)):
        alone = Sampler(1, vocab)
        alone.start(0, params, seed, [1, 2])
        assert [int(alone.sample(step[row:row + 1])[0]) for step in logits] == picks[row].tolist()
    assert 4 not in picks[2].tolist()


def test_logit_bias_forces_a_token_through_lm_generate_and_is_checked_against_the_vocabulary(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=64)
    token = lm.encode(" the")[0]
    completion = lm.complete(["Once upon a time"], max_new_tokens=6, temperature=0, logit_bias={token: 100})[0]
    assert completion.token_ids == [token] * 6
    with pytest.raises(SamplingParamError, match="logit_bias"):
        lm.generate("Once", max_new_tokens=2, logit_bias={lm.config.vocab_size: 1})


# ---- stop strings -------------------------------------------------------------------------------------------


class ChunkTokenizer:
    """A stand-in whose token i decodes to chunks[i], to drive StreamText with any text."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks

    def incremental_decoder(self):
        chunks = self.chunks

        class Decoder:
            def push(self, token: int) -> str:
                return chunks[token]

            def flush(self) -> str:
                return ""

        return Decoder()


def quadratic_release(chunks: list[str], stop: list[str]) -> tuple[list[str], bool]:
    """The stop rule as it was (re-checking every prefix of every stop string): the reference semantics."""
    text, released, deltas = "", 0, []
    for chunk in chunks:
        text += chunk
        found, stopped = generation.cut_at_stop(text, stop)
        end = len(found)
        if not stopped:
            end -= max((n for s in stop for n in range(1, len(s)) if found.endswith(s[:n])), default=0)
        deltas.append(found[released:end])
        released = max(released, end)
        if stopped:
            return deltas, True
    found, stopped = generation.cut_at_stop(text, stop)
    deltas.append(found[released:])
    return deltas, stopped


def linear_release(chunks: list[str], stop: list[str]) -> tuple[list[str], bool]:
    stream = StreamText(ChunkTokenizer(chunks), stop)
    deltas = []
    for token in range(len(chunks)):
        delta, stopped = stream.push(token)
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(stream.finish())
    return deltas, False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("abc", max_size=4), max_size=12), st.lists(st.text("abc", min_size=1, max_size=6),
                                                                    min_size=1, max_size=4))
def test_stop_matching_releases_what_the_quadratic_check_released(chunks, stop):
    assert linear_release(chunks, stop) == quadratic_release(chunks, stop)


def test_a_100k_character_stop_string_costs_milliseconds():
    stop = "ab" * 50_000                       # every end of "...abab" begins it: the worst case for hold-back
    chunks = ["ab"] * 400 + ["x", "done"]
    with deadline(5):
        started = time.perf_counter()
        deltas, stopped = linear_release(chunks, [stop, "never", "y" * 100_000])
        elapsed = time.perf_counter() - started
    assert not stopped and "".join(deltas) == "".join(chunks)
    assert deltas[:400] == [""] * 400           # held back while it could still begin the stop string
    assert elapsed < 0.25
    with deadline(5):
        started = time.perf_counter()
        deltas, stopped = linear_release(["a", "b"] * 50_000 + ["tail"], ["zz", stop])
        elapsed = time.perf_counter() - started
    assert stopped and "".join(deltas) == "" and elapsed < 1.0  # 100,000 pushes, then the stop string appears


# ---- the engine ------------------------------------------------------------------------------------------------


def poison(engine: Engine, victim) -> None:
    """Make the decode step's logits and the slot's keys/values NaN for the slots of requests `victim(request)`
    picks (a model whose numbers blew up for one sequence)."""
    step = engine.step

    def poisoned(tokens, positions, cache, mask, logit_rows=None):
        logits = step(tokens, positions, cache, mask, logit_rows=logit_rows).clone()
        if logit_rows is not None:  # a prompt's chunk, whose rows are not slots: the decode steps poison
            return logits
        for slot, sequence in engine._decoding.items():
            if victim(sequence.request):
                logits[slot] = float("nan")
                engine.cache.keys[:, slot] = float("nan")
                engine.cache.values[:, slot] = float("nan")
        return logits

    engine.step = poisoned


def test_a_numerical_failure_ends_its_request_alone_and_the_others_equal_solo(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=128)
    prompts = [lm.encode(text) for text in ["Hello there", "To be, or not to be", "x", "The quick brown fox"]]
    lengths = [20, 16, 24, 12]
    expected = [lm.complete([p], max_new_tokens=n, temperature=0)[0].text for p, n in zip(prompts, lengths,
                                                                                             strict=True)]
    engine = Engine(lm, max_slots=4, max_queue=8, context=128)
    sinks = [queue.SimpleQueue() for _ in range(5)]
    requests = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0), sink.put)
                for p, n, sink in zip(prompts, lengths, sinks[:4], strict=True)]
    victim = engine.submit(lm.encode("Once upon a time"), SamplingParams(max_new_tokens=30, temperature=0.8,
                                                                          seed=3), sinks[4].put)
    poison(engine, lambda request: request is victim)
    engine.start()
    try:
        results = [drain(sink) for sink in sinks]
        assert [text for text, _, _ in results[:4]] == expected
        assert all(reason == "length" for _, reason, _ in results[:4])
        assert results[4][1:] == (None, "numerical_error")
        assert engine.alive and engine.active_sequences == 0 and engine.queued_sequences == 0
        assert requests[0].running == 0
        # Every slot again, the victim's among them: nothing of its NaN keys/values is left behind.
        sinks = [queue.SimpleQueue() for _ in range(4)]
        for p, n, sink in zip(prompts, lengths, sinks, strict=True):
            engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0), sink.put)
        assert [drain(sink)[0] for sink in sinks] == expected
    finally:
        engine.stop()


def test_a_small_request_is_not_stuck_behind_a_request_of_many_choices(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=128)
    prompt = lm.encode("To be, or not to be")
    engine = Engine(lm, max_slots=4, max_queue=8, context=128).start()
    finished: list[str] = []

    def sink(name: str):
        def put(events) -> None:
            finished.extend(name for event in events if event.finish_reason or event.error)
        return put

    try:
        engine.submit(prompt, SamplingParams(max_new_tokens=24, temperature=0), sink("big"), n=16)
        wait_for(lambda: engine.active_sequences == 4)
        assert engine.queued_sequences == 12 and engine.queued_tokens == 12 * 24
        engine.submit(prompt, SamplingParams(max_new_tokens=4, temperature=0), sink("small"))
        wait_for(lambda: len(finished) == 17, timeout=120)
        # Admitted at the first free slot: done while the big request still has choices waiting or running.
        assert finished.index("small") < 8, finished
    finally:
        engine.stop()


def test_queued_work_is_capped_in_tokens(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=128)
    prompt = lm.encode("Hello")
    engine = Engine(lm, max_slots=2, max_queue=8, context=128, max_queued_tokens=100)
    big = engine.submit(prompt, SamplingParams(max_new_tokens=50), lambda events: None, n=4)  # nothing queued: in
    assert (engine.queued_sequences, engine.queued_tokens) == (4, 200)
    with pytest.raises(QueueFull, match="limit of 100"):
        engine.submit(prompt, SamplingParams(max_new_tokens=5), lambda events: None)
    with pytest.raises(SamplingParamError, match="logit_bias"):  # refused at once, not on the engine thread
        engine.submit(prompt, SamplingParams(logit_bias={lm.config.vocab_size: 1.0}), lambda events: None)
    engine.abort(big)
    engine.start()
    try:
        wait_for(lambda: engine.queued_tokens == 0)
        assert engine.generate(prompt, SamplingParams(max_new_tokens=5, temperature=0), n=2)[0].finish_reason
    finally:
        engine.stop()


# ---- over HTTP -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(tokenizer: Tokenizer):
    """An in-process app over a tiny engine whose decode step turns NaN for requests seeded 666."""
    from starlette.testclient import TestClient

    from sparkgpt.serve.api import create_app

    lm = tiny_lm(tokenizer, max_seq_len=128)
    holder: dict[str, Engine] = {}

    def load_engine() -> Engine:
        engine = Engine(lm, max_slots=4, max_queue=8, context=128)
        poison(engine, lambda request: request.params.seed == 666)
        holder["engine"] = engine
        return engine.start()

    with TestClient(create_app("m", load_engine, api_key=API_KEY)) as client:
        wait_for(lambda: client.get("/health").status_code == 200)
        yield client, holder["engine"], lm


def post(client, body: dict, route: str = "/v1/completions"):
    return client.post(route, json={"model": "m", **body}, headers=HEADERS)


def test_http_numerical_failure_is_that_requests_error_and_the_server_goes_on(http):
    client, engine, lm = http
    prompt = lm.encode("Once upon a time")
    response = post(client, {"prompt": prompt, "max_tokens": 10, "seed": 666})
    assert response.status_code == 400  # its own sampling parameters made the logits non-finite
    assert response.json()["error"]["code"] == "numerical_error" and response.json()["error"]["type"]
    with client.stream("POST", "/v1/completions", headers=HEADERS,
                       json={"model": "m", "prompt": prompt, "max_tokens": 10, "seed": 666, "stream": True}) as s:
        events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "numerical_error"
    ok = post(client, {"prompt": prompt, "max_tokens": 10, "temperature": 0})
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["text"] == lm.complete([prompt], max_new_tokens=10, temperature=0)[0].text
    assert client.get("/health").status_code == 200 and engine.alive


@pytest.mark.parametrize("body, param", [
    ({"repetition_penalty": 1e-300}, "repetition_penalty"), ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"logit_bias": {"999999": 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_http_bad_sampling_values_are_400_naming_the_field(http, body, param):
    client, _, _ = http
    response = post(client, {"prompt": "Hello", "max_tokens": 3, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_http_new_samplers_equal_lm_generate(http):
    client, _, lm = http
    prompt = lm.encode("To be, or not to be")
    token = lm.encode(" the")[0]
    for body, sampling in [
        ({"logit_bias": {str(token): 100}}, {"logit_bias": {token: 100}}),
        ({"frequency_penalty": 2.0, "presence_penalty": 1.0}, {"frequency_penalty": 2.0, "presence_penalty": 1.0}),
        ({"min_p": 0.2, "temperature": 1.0, "seed": 5}, {"min_p": 0.2, "temperature": 1.0, "seed": 5}),
        ({"temperature": 1e-40, "seed": 9}, {"temperature": 0}),
    ]:
        reply = post(client, {"prompt": prompt, "max_tokens": 12, "temperature": 0, **body})
        assert reply.status_code == 200, reply.text
        expected = lm.complete([prompt], max_new_tokens=12, **{"temperature": 0, **sampling})[0]
        assert reply.json()["choices"][0]["text"] == expected.text, body
    forced = post(client, {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logit_bias": {str(token): 100}})
    assert forced.json()["choices"][0]["text"] == lm.tokenizer.decode([token] * 5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_fails_its_requests_and_health_is_503(tokenizer: Tokenizer):
    from starlette.testclient import TestClient

    from sparkgpt.serve.api import create_app

    lm = tiny_lm(tokenizer, max_seq_len=64)
    holder: dict[str, Engine] = {}

    def load_engine() -> Engine:
        holder["engine"] = engine = Engine(lm, max_slots=2, context=64).start()
        return engine

    with TestClient(create_app("m", load_engine, api_key=API_KEY)) as client:
        wait_for(lambda: client.get("/health").status_code == 200)
        engine = holder["engine"]
        admit = engine._admit

        def broken_admit() -> None:
            if engine._waiting:
                raise RuntimeError("scheduler bug")
            admit()

        engine._admit = broken_admit
        events: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit(lm.encode("Hello"), SamplingParams(max_new_tokens=4), events.put, n=2)
        failed = events.get(timeout=30)
        assert [event.code for event in failed] == ["engine_error"] * 2 and "scheduler bug" in failed[0].error
        wait_for(lambda: not engine.alive)
        assert "scheduler bug" in engine.error
        health = client.get("/health")
        assert health.status_code == 503 and "scheduler bug" in health.json()["error"]
        response = post(client, {"prompt": "Hello", "max_tokens": 3})
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
        chat = post(client, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                    route="/v1/chat/completions")
        assert chat.status_code == 503

