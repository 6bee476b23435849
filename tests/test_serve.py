"""`sparkgpt serve`: the continuous-batching engine, and a real server process driven by the official openai client.

Most tests serve a tiny random Llama-style checkpoint built here (fast); one slow test serves the real SmolLM2.
"""

from __future__ import annotations

import gc
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import sparkgpt
from sparkgpt import GPT, LM, ModelConfig, SamplingParams, Tokenizer
from sparkgpt.errors import SparkGPTError
from sparkgpt.serve.engine import Engine, QueueFull

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

API_KEY = "sk-test-key"
MODEL = "tiny-chat"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
USER = [{"role": "user", "content": "To be, or not to be?"}]


def tiny_lm(tokenizer: Tokenizer, positions: str = "rope", max_seq_len: int = 512) -> LM:
    """A random model; a wide init spreads its logits, so greedy choices are far from ties. No end token, so
    only max_tokens or a stop string ends a reply (lengths are exact)."""
    chat_tokenizer = Tokenizer(tokenizer.backend, chat_template=CHATML)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=128,
                         max_seq_len=max_seq_len, positions=positions, norm="rmsnorm", ffn="swiglu", bias=False,
                         initializer_range=0.2)
    return LM(GPT(config).eval(), chat_tokenizer)


def collect_texts(sinks: list[queue.SimpleQueue]) -> list[str]:
    """Each engine sink's whole text, read until its finish event (an error event fails the test)."""
    texts = []
    for sink in sinks:
        text, done = "", False
        while not done:
            for event in sink.get(timeout=60):
                assert event.error is None
                text, done = text + event.text, event.finish_reason is not None
        texts.append(text)
    return texts


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """A tiny model gains nothing from more threads, and on a busy 2-core machine idle OpenMP workers waiting
    for a core make each op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoint(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm(tokenizer).save(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="module")
def reference_lm(tiny_checkpoint: Path) -> LM:
    """The served checkpoint loaded in this process: the reference for token counts and greedy text."""
    return sparkgpt.load(tiny_checkpoint, device="cpu")


# ---- the engine alone -------------------------------------------------------------------------------------------


# Sinusoidal positions: a decoder the lean decode step does not cover, which the engine decodes with its forward.
@pytest.mark.parametrize("positions", ["rope", "learned", "sinusoidal"])
def test_engine_batches_ragged_requests_and_each_equals_solo_generation(tokenizer: Tokenizer, positions: str):
    lm = tiny_lm(tokenizer, positions=positions, max_seq_len=128)
    prompts = [lm.encode(text) for text in ["Hello there", "To be, or not to be, that is the question", "x",
                                             "def add(a, b):\n    return a + b", "The quick brown fox"]]
    lengths = [30, 12, 50, 7, 1]
    expected = [lm.complete([p], max_new_tokens=n, temperature=0)[0].text
                for p, n in zip(prompts, lengths, strict=True)]
    # 3 slots for 5 requests: two wait for a slot; a prefill chunk of 4 tokens splits every longer prompt.
    engine = Engine(lm, max_slots=3, max_queue=8, context=128, prefill_chunk=4).start()
    try:
        results: list[str | None] = [None] * len(prompts)

        def run(i: int) -> None:
            results[i] = engine.generate(prompts[i], SamplingParams(max_new_tokens=lengths[i], temperature=0),
                                         timeout=60)[0].text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert results == expected
        assert engine.active_sequences == 0 and engine.queue_depth == 0
    finally:
        engine.stop()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_newcomers_admitted_together_are_prefilled_in_one_forward_and_each_equals_solo(
        tokenizer: Tokenizer, positions: str):
    lm = tiny_lm(tokenizer, positions=positions, max_seq_len=128)
    base = lm.encode("To be, or not to be, that is the question")
    # Different lengths (left padding in the batch), and first a prompt that extends `base`, whose keys/values its
    # slot will hold already: that row starts at a cached column while the others start at 0.
    prompts = [base + lm.encode(" Whether 'tis nobler")]
    prompts += [lm.encode(text) for text in ["x", "Hello there", "def add(a, b):\n    return a + b"]]
    lengths = [11, 9, 14, 5]
    expected = [lm.complete([p], max_new_tokens=n, temperature=0)[0].text for p, n in zip(prompts, lengths,
                                                                                             strict=True)]
    forwards: list[tuple[int, ...]] = []  # input shapes of the model's general forward (prefills; decode is lean)
    lm.model.register_forward_pre_hook(lambda module, args: forwards.append(tuple(args[0].shape)))

    def run_together(engine: Engine) -> list[str]:
        """Submit every prompt before the engine thread starts, so that one iteration admits them all."""
        events: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in prompts]
        for prompt, n, sink in zip(prompts, lengths, events, strict=True):
            engine.submit(prompt, SamplingParams(max_new_tokens=n, temperature=0), sink.put)
        engine.start()
        texts = collect_texts(events)
        engine.stop()
        return texts

    engine = Engine(lm, max_slots=4, max_queue=8, context=128)
    engine.start()
    assert engine.generate(base, SamplingParams(max_new_tokens=2, temperature=0))[0].text  # fills slot 0
    engine.stop()
    forwards.clear()
    assert run_together(engine) == expected
    # The first row's few tokens after its cached `base` take the lean decode step; the three fresh prompts one
    # forward together, as each would alone.
    longest = max(len(p) for p in prompts[1:])
    assert forwards == [(3, longest)] and engine.prefills == 2
    assert engine.reused_prompt_tokens >= len(base)

    # A budget below rows × width: each forward stays within it, the rest waits for the next iteration.
    budget = 2 * longest
    engine = Engine(lm, max_slots=4, max_queue=8, context=128, prefill_chunk=budget)
    forwards.clear()
    assert run_together(engine) == expected
    assert 1 < len(forwards) < len(prompts) + 1 and all(rows * width <= budget for rows, width in forwards)


def test_packed_output_head_equals_torch_linear(tokenizer: Tokenizer):
    from sparkgpt.model.decode import PackedHead

    lm = tiny_lm(tokenizer, max_seq_len=64)
    head = lm.model.lm_head
    engine = Engine(lm, max_slots=2, context=64)  # on a CPU the engine's model has a oneDNN copy of a float32 head
    packed = engine.model.lm_head
    assert isinstance(packed, PackedHead) and packed.weight is engine.model.token_embedding.weight
    assert torch.equal(packed.weight, head.weight)
    for shape in [(1, 64), (1, 1, 64), (8, 64), (3, 5, 64)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-5)
    assert set(engine.model.state_dict()) == set(tiny_lm(tokenizer, max_seq_len=64).model.state_dict())


def test_engine_leaves_the_callers_model_as_it_was_and_keeps_no_reference_to_it(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=64)
    expected = lm.generate("Once upon a time", max_new_tokens=12, temperature=0)
    model, head = lm.model, lm.model.lm_head
    before = [(name, p, p.stride()) for name, p in model.named_parameters()]
    engine = Engine(lm, max_slots=2, context=64)
    assert engine.model is not model
    assert [(name, p, p.stride()) for name, p in model.named_parameters()] == before  # the same tensors, strides
    assert model.lm_head is head and type(head) is torch.nn.Linear and model.token_embedding.weight is head.weight
    assert lm.generate("Once upon a time", max_new_tokens=12, temperature=0) == expected
    # What the engine lays out anew is its own; the rest (the norms here) it shares with the caller's model.
    norms = {name: p for name, p in model.named_parameters() if "norm" in name}
    assert norms and all(p is norms[name] for name, p in engine.model.named_parameters() if name in norms)
    # Once the caller lets its model go, nothing of it that the engine does not use stays alive.
    gone = [weakref.ref(model), weakref.ref(head.weight)]
    del lm, model, head, before, norms
    gc.collect()
    assert [ref() for ref in gone] == [None, None]
    engine.start()
    try:
        assert engine.generate(engine.lm.encode("Once upon a time"),
                               SamplingParams(max_new_tokens=12, temperature=0))[0].text == expected
    finally:
        engine.stop()


def test_engine_per_request_sampling_stop_strings_and_limits(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=64)
    engine = Engine(lm, max_slots=2, max_queue=0, context=64).start()
    try:
        prompt = lm.encode("Once upon a time")
        greedy = engine.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0))[0]
        assert greedy.finish_reason == "length"
        assert greedy.text == lm.generate("Once upon a time", max_new_tokens=20, temperature=0)
        # The same prompt again: its keys/values are copied from the slot that computed them, not recomputed.
        again = engine.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0))[0]
        assert again.text == greedy.text and engine.reused_prompt_tokens == len(prompt) - 1
        # Seeded sampling is reproducible, and choice i of n uses seed + i.
        sampled = engine.generate(prompt, SamplingParams(max_new_tokens=20, temperature=1.0, seed=7), n=2)
        again = engine.generate(prompt, SamplingParams(max_new_tokens=20, temperature=1.0, seed=7), n=2)
        assert [c.text for c in sampled] == [c.text for c in again]
        shifted = engine.generate(prompt, SamplingParams(max_new_tokens=20, temperature=1.0, seed=8))[0]
        assert shifted.text == sampled[1].text
        # A stop string cuts the text before it and ends the sequence.
        stop = greedy.text[5:8]
        cut = engine.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0, stop=[stop]))[0]
        assert (cut.text, cut.finish_reason) == (greedy.text[: greedy.text.find(stop)], "stop")
        with pytest.raises(SparkGPTError, match="maximum context length is 64"):
            engine.submit(prompt, SamplingParams(max_new_tokens=61), lambda events: None)
        # Two slots and no waiting line: a third request is refused at once.
        long = SamplingParams(max_new_tokens=48, temperature=0)
        held = [engine.submit(prompt, long, lambda events: None) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(prompt, long, lambda events: None)
        for request in held:
            engine.abort(request)
        deadline = time.monotonic() + 10
        while engine.active_sequences and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active_sequences == 0
    finally:
        engine.stop()


def test_nucleus_finds_the_same_tokens_as_a_full_sort():
    from sparkgpt.generate import nucleus

    torch.manual_seed(0)
    for scale, top_p in ((3.0, 0.9), (3.0, 0.5), (0.05, 0.95), (1.0, 0.999)):  # small scales force the full sort
        logits = torch.randn(4, 50_000) * scale
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p
        expected = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
        assert torch.equal(nucleus(logits, top_p).isinf(), expected.isinf())


def test_health_is_503_while_loading_then_200(tokenizer: Tokenizer):
    from starlette.testclient import TestClient

    from sparkgpt.serve.api import create_app

    loaded = threading.Event()

    def load_engine() -> Engine:
        loaded.wait(timeout=30)
        return Engine(tiny_lm(tokenizer, max_seq_len=64), max_slots=1).start()

    with TestClient(create_app("m", load_engine, api_key=API_KEY)) as client:
        assert client.get("/health").status_code == 503
        response = client.post("/v1/completions", json={"model": "m", "prompt": "hi"},
                               headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_loading"
        loaded.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").json() == {"status": "ok", "model": "m"}
        assert client.get("/").status_code == 200 and "<script" in client.get("/").text

    def broken() -> Engine:
        raise SparkGPTError("no such checkpoint")

    with TestClient(create_app("m", broken)) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").json() == {"status": "error", "error": "no such checkpoint"}


# ---- a real server process --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m sparkgpt serve ...` on a free loopback port, stopped on close."""

    def __init__(self, ref: str | Path, *options: str, log: Path, timeout: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "sparkgpt", "serve", str(ref), "--port", str(self.port),
                   "--log-level", "warning", *options]
        threads = [] if "--threads" in options else ["--threads", "1"]  # see one_torch_thread
        command += threads
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.close()
        raise AssertionError(f"server not healthy after {timeout} s:\n{log.read_text()}")

    def client(self, api_key: str = API_KEY, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **options)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    server = Server(tiny_checkpoint, "--api-key", API_KEY, "--model-name", MODEL, "--max-concurrency", "8",
                    "--max-queue", "32", log=log)
    yield server
    server.close()


def test_models_health_and_metrics(server: Server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # open without a key
    assert [m.id for m in server.client().models.list()] == [MODEL]
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for series in ("sparkgpt_requests_total", "sparkgpt_generation_tokens_total", "sparkgpt_queue_depth",
                   "sparkgpt_request_latency_seconds_bucket", "sparkgpt_time_to_first_token_seconds_bucket"):
        assert series in text
    assert httpx.get(f"{server.url}/metrics").status_code == 401


def test_chat_streamed_equals_non_streamed_and_usage_is_right(server: Server, reference_lm: LM):
    client = server.client()
    reply = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=24)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.content == reference_lm.chat(USER, temperature=0, max_new_tokens=24)
    prompt_tokens = len(reference_lm.chat_prompt(USER))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt_tokens, 24, prompt_tokens + 24)

    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_completion_streamed_equals_non_streamed_with_n_seed_and_stop(server: Server, reference_lm: LM):
    client = server.client()
    prompt = "The quick brown fox"
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    text = reply.choices[0].text
    assert text == reference_lm.generate(prompt, temperature=0, max_new_tokens=20)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(reference_lm.encode(prompt)), 20)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=20, stream=True))
    assert streamed == text

    stop = text[6:9]
    stopped = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20, stop=[stop])
    assert stopped.choices[0].text == text[: text.find(stop)] and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 20

    sampled = client.completions.create(model=MODEL, prompt=prompt, temperature=1.0, top_p=0.9, seed=3, n=3,
                                        max_tokens=12)
    again = client.completions.create(model=MODEL, prompt=prompt, temperature=1.0, top_p=0.9, seed=3, n=3,
                                      max_tokens=12)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert sampled.usage.completion_tokens == 36


def test_seeded_sample_is_the_same_from_lm_generate_alone_in_a_batch_and_from_the_server(
        server: Server, reference_lm: LM):
    """One sampler, one random stream per sequence: `LM.generate` with seed s alone, the same prompt in a batch of
    prompts of other lengths, and the server's choice i of a request seeded s - i all draw the same tokens."""
    prompt = "Once upon a time"
    sampling = dict(temperature=0.9, top_p=0.8, max_new_tokens=16)
    alone = [reference_lm.generate(prompt, seed=seed, **sampling) for seed in (21, 22)]
    assert alone[0] != alone[1]
    batch = ["x", prompt, "To be, or not to be, that is the question"]
    assert reference_lm.generate(batch, seed=21, **sampling)[1] == alone[0]
    client = server.client()
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0.9, top_p=0.8, seed=21, n=2,
                                      max_tokens=16)
    assert [c.text for c in reply.choices] == alone  # choice i draws as a generation seeded 21 + i
    reply = client.completions.create(model=MODEL, prompt=batch, temperature=0.9, top_p=0.8, seed=21, max_tokens=16)
    assert reply.choices[1].text == alone[0]  # decoded in one batch with the other prompts


def bad_inputs() -> list:
    chat = dict(model=MODEL, messages=USER, max_tokens=4)
    return [
        pytest.param(dict(chat, temperature=2.5), "BadRequestError", 400, "temperature", id="temperature>2"),
        pytest.param(dict(chat, temperature=-0.1), "BadRequestError", 400, "temperature", id="temperature<0"),
        pytest.param(dict(chat, temperature="hot"), "BadRequestError", 400, "temperature", id="temperature-str"),
        pytest.param(dict(chat, top_p=0), "BadRequestError", 400, "top_p", id="top_p=0"),
        pytest.param(dict(chat, top_p=1.5), "BadRequestError", 400, "top_p", id="top_p>1"),
        pytest.param(dict(chat, max_tokens=0), "BadRequestError", 400, "max_tokens", id="max_tokens=0"),
        pytest.param(dict(chat, max_tokens=2.5), "BadRequestError", 400, "max_tokens", id="max_tokens-float"),
        pytest.param(dict(chat, n=0), "BadRequestError", 400, "n", id="n=0"),
        pytest.param(dict(chat, stop=""), "BadRequestError", 400, "stop", id="stop-empty"),
        pytest.param(dict(chat, stop=["ok", ""]), "BadRequestError", 400, "stop", id="stop-list-empty"),
        pytest.param(dict(chat, seed="x"), "BadRequestError", 400, "seed", id="seed-str"),
        pytest.param(dict(chat, messages=[{"role": "wizard", "content": "hi"}]), "BadRequestError", 400,
                     "messages[0].role", id="bad-role"),
        pytest.param(dict(chat, messages=[]), "BadRequestError", 400, "messages", id="no-messages"),
        pytest.param(dict(chat, messages=[{"role": "user", "content": 5}]), "BadRequestError", 400,
                     "messages[0].content", id="bad-content"),
        pytest.param(dict(chat, extra_body={"bogus": 1}), "BadRequestError", 400, "bogus", id="unknown-field"),
        pytest.param(dict(chat, max_tokens=600), "BadRequestError", 400, "messages", id="context-length"),
        pytest.param(dict(chat, model="gpt-nope"), "NotFoundError", 404, "model", id="unknown-model"),
    ]


@pytest.mark.parametrize(("kwargs", "error_class", "status", "param"), bad_inputs())
def test_bad_chat_input_raises_the_matching_client_error(server: Server, kwargs, error_class, status, param):
    client = server.client()
    for stream in (False, True):  # a stream is refused before its first byte, with the same error
        with pytest.raises(getattr(openai, error_class)) as caught:
            client.chat.completions.create(**kwargs, stream=stream)
        assert caught.value.status_code == status
        error = caught.value.body
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
        if kwargs.get("max_tokens") == 600:
            assert error["code"] == "context_length_exceeded"


def test_bad_completion_input_and_auth(server: Server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000)
    assert caught.value.body["param"] == "prompt" and caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[[1, 10**6]], max_tokens=2)
    assert caught.value.body["param"] == "prompt"
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(api_key="sk-wrong").chat.completions.create(model=MODEL, messages=USER)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    url = f"{server.url}/v1/chat/completions"
    missing = httpx.post(url, json={"model": MODEL, "messages": USER})
    assert missing.status_code == 401 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000):
        response = httpx.post(url, content=body, headers=auth)
        assert response.status_code == 400, body[:10]
        assert response.json()["error"]["type"] == "invalid_request_error"
    for value in (b"NaN", b"Infinity", b"-Infinity"):  # Python's json reads these; the official client never sends
        body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % (
            MODEL.encode(), value)
        response = httpx.post(url, content=body, headers=auth)
        assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
    assert httpx.get(f"{server.url}/v1/nothing-here", headers=auth).status_code == 404


def test_eight_concurrent_streams_each_equal_their_solo_output(server: Server):
    client = server.client()
    prompts = [f"Story {i}: once upon a time" + " and" * i for i in range(8)]
    lengths = [16 + 4 * i for i in range(8)]  # different lengths: sequences leave the batch at different steps

    def stream(i: int) -> str:
        chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}],
                                                temperature=0, max_tokens=lengths[i], stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    solo = [stream(i) for i in range(8)]
    results: list[str | None] = [None] * 8
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(i))) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == solo
    assert len(set(solo)) == 8


@pytest.fixture(scope="module")
def one_slot_server(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A long context, so that one request can keep the only slot busy for seconds.
    checkpoint = tiny_lm(tokenizer, max_seq_len=4096).save(tmp_path_factory.mktemp("serve") / "tiny-long")
    log = tmp_path_factory.mktemp("logs") / "one-slot.log"
    server = Server(checkpoint, "--api-key", API_KEY, "--model-name", MODEL, "--max-concurrency", "1",
                    "--max-queue", "0", log=log)
    yield server
    server.close()


def test_queue_full_then_disconnect_frees_the_slot(one_slot_server: Server):
    server = one_slot_server
    client = server.client()
    body = {"model": MODEL, "messages": USER, "max_tokens": 4000, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # held: an iterator closed early would close the connection too
        for line in lines:
            if '"content": "' in line and '"content": ""' not in line:
                break  # text is streaming
        assert server.metric("sparkgpt_active_sequences") == 1
        # The only slot is busy and nobody may wait: refused at once, in OpenAI's shape.
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        assert caught.value.status_code == 429 and caught.value.body["code"] == "queue_full"
    # Leaving the `with` closed the connection mid-stream: the sequence is aborted and its slot freed.
    deadline = time.monotonic() + 15
    while server.metric("sparkgpt_active_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("sparkgpt_active_sequences") == 0
    assert server.metric("sparkgpt_requests_aborted_total") >= 1
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_serve_rejects_a_bad_reference_before_binding(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "sparkgpt", "serve", str(tmp_path / "missing"),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "sparkgpt: error:" in result.stderr


@pytest.mark.slow
def test_real_smollm2_chat_over_http(smollm2_gguf: Path, tmp_path: Path):
    server = Server("smollm2-135m-instruct", "--max-concurrency", "4", "--context", "1024", log=tmp_path / "log")
    try:
        client = server.client(api_key="unused")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                               max_tokens=40)
        assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2-135m-instruct", messages=messages, temperature=0, max_tokens=40, stream=True) if c.choices)
        assert streamed == reply.choices[0].message.content
    finally:
        server.close()


def test_metrics_count_tokens(server: Server):
    before = server.metric("sparkgpt_generation_tokens_total")
    server.client().completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=0)
    assert server.metric("sparkgpt_generation_tokens_total") == before + 5
