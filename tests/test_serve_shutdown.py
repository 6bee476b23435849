"""`sparkgpt serve` on SIGTERM drains: a stream in flight ends with [DONE] (finished, or with a 503-shaped error
event when it outlasts --shutdown-timeout), new requests meanwhile get 503, /health says "draining", and the
process then exits."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.test_serve import MODEL, USER, Server, one_torch_thread, tiny_lm  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def long_context_checkpoint(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm(tokenizer, max_seq_len=8192).save(tmp_path_factory.mktemp("drain") / MODEL)


def stream_events(response: httpx.Response):
    """The data payloads of a server-sent event stream, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def start_stream(client: httpx.Client, server: Server, max_tokens: int):
    request = client.build_request("POST", f"{server.url}/v1/chat/completions", json={
        "model": MODEL, "messages": USER, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    events = stream_events(response)
    first = next(events)  # the stream is running before the signal
    return response, events, first


def test_sigterm_lets_a_stream_finish_while_new_requests_get_503(long_context_checkpoint, tmp_path):
    server = Server(long_context_checkpoint, "--shutdown-timeout", "60", "--context", "8192",
                    log=tmp_path / "log.txt")
    try:
        with httpx.Client(timeout=60) as client:
            response, events, _ = start_stream(client, server, max_tokens=6000)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused = httpx.post(f"{server.url}/v1/chat/completions", timeout=10,
                                 json={"model": MODEL, "messages": USER, "max_tokens": 4})
            health = httpx.get(f"{server.url}/health", timeout=10)
            rest = list(events)
            response.close()
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        assert last["choices"][0]["finish_reason"] == "length", last  # ran to its end, not cut
        server.process.wait(timeout=30)  # then the server exits on its own
    finally:
        server.close()


def test_a_stream_past_the_shutdown_timeout_ends_with_an_error_event_and_done(long_context_checkpoint, tmp_path):
    server = Server(long_context_checkpoint, "--shutdown-timeout", "0.5", "--context", "8192",
                    log=tmp_path / "log.txt")
    try:
        with httpx.Client(timeout=60) as client:
            response, events, _ = start_stream(client, server, max_tokens=8000)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            rest = list(events)
            response.close()
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["code"] == "server_shutting_down" and "shutdown timeout" in error["message"], error
        server.process.wait(timeout=30)
        assert time.monotonic() - signalled < 15
    finally:
        server.close()
