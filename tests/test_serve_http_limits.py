"""`sparkgpt serve` against hostile clients (issue 23): the body limit (413, read incrementally), valid-but-hostile
JSON (400, never 500), templates and tokenisation off the event loop, non-streaming disconnects, slow clients and
oversized headers (408, 431, a connection cap), and the Host / Content-Type guard of a loopback server without a key.

One real server (a tiny random model with a long context, no API key, small limits) is driven over raw sockets where
the HTTP must be malformed or slow; the guard's rules are also checked in-process.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Iterator

import pytest

from sparkgpt import Tokenizer
from sparkgpt.serve.engine import Engine
from tests.test_serve import MODEL, USER, Server, one_torch_thread, tiny_lm  # noqa: F401 (a fixture)

httpx = pytest.importorskip("httpx")

BODY_LIMIT = 64 * 1024
RECEIVE_TIMEOUT = 2.0
SLACK = 15.0  # the deadline must end a stalled connection, not hold to the second on a loaded 2-core CI machine
MAX_CONNECTIONS = 12
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def open_server(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Bound to loopback without an API key (so guarded), with a long context: one request can generate for seconds."""
    checkpoint = tiny_lm(tokenizer, max_seq_len=4096).save(tmp_path_factory.mktemp("serve") / "tiny-long")
    log = tmp_path_factory.mktemp("logs") / "open.log"
    server = Server(checkpoint, "--model-name", MODEL, "--max-concurrency", "2", "--max-queue", "8",
                    "--max-body-bytes", str(BODY_LIMIT), "--timeout-receive", str(RECEIVE_TIMEOUT),
                    "--max-connections", str(MAX_CONNECTIONS), log=log)
    yield server
    server.close()


def connect(server: Server, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Read until the server closes the connection or a whole Content-Length body is in: (status, body)."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                return int(head.split(b" ", 2)[1]), body[:length]
        chunk = sock.recv(65536)
        if not chunk:
            if not sep:
                raise ConnectionError(f"closed without a response (got {data[:200]!r})")
            return int(head.split(b" ", 2)[1]), body
        data += chunk


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def head(server: Server, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, "temperature": 0, **fields}


# ---- 1. the body limit --------------------------------------------------------------------------------------------


def test_a_declared_oversized_body_is_413_at_once(open_server: Server):
    with connect(open_server) as sock:  # 32 MiB announced, 1 KiB sent: the answer must not wait for the rest
        sock.sendall(head(open_server, "POST", "/v1/chat/completions",
                          {"Content-Type": "application/json", "Content-Length": str(32 * 1024 * 1024)}) + b"{" * 1024)
        status, body = read_response(sock)
        assert status == 413
        assert json.loads(body)["error"]["code"] == "request_too_large"


def test_a_chunked_body_is_refused_once_past_the_limit_without_waiting_for_its_end(open_server: Server):
    with connect(open_server) as sock:
        sock.sendall(head(open_server, "POST", "/v1/chat/completions",
                          {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}))
        chunk = b"x" * 8192
        for _ in range(3 * BODY_LIMIT // len(chunk)):  # three times the limit, and no final chunk: never ends
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, body = read_response(sock)
        assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"
        assert closed_by_server(sock)  # the rest is not read: the connection ends with the answer


def test_a_body_under_the_limit_is_served_and_one_over_is_413(open_server: Server):
    url = f"{open_server.url}/v1/chat/completions"
    small = httpx.post(url, json=chat_body(user="u" * (BODY_LIMIT - 1000)), timeout=60)
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2
    large = httpx.post(url, json=chat_body(user="u" * BODY_LIMIT), timeout=60)
    assert large.status_code == 413
    assert set(large.json()["error"]) == {"message", "type", "param", "code"}


# ---- 2. hostile but valid JSON --------------------------------------------------------------------------------------


CHAT_START = b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], '
HUGE = b"1" + b"0" * 400  # 401 digits: beyond a float
HOSTILE = {  # the body, and the param a chat request's error names
    "401-digit-temperature": (CHAT_START + b'"temperature": ' + HUGE + b"}", "temperature"),
    "401-digit-top-p": (CHAT_START + b'"top_p": -' + HUGE + b"}", "top_p"),
    "401-digit-max-tokens": (CHAT_START + b'"max_tokens": ' + HUGE + b"}", "max_tokens"),
    "401-digit-seed": (CHAT_START + b'"seed": ' + HUGE + b"}", "seed"),
    "401-digit-n": (CHAT_START + b'"n": ' + HUGE + b"}", "n"),
    "401-digit-presence": (CHAT_START + b'"presence_penalty": ' + HUGE + b"}", "presence_penalty"),
    "4301-digit-integer": (CHAT_START + b'"max_tokens": ' + b"9" * 4301 + b"}", "max_tokens"),
    "huge-float": (CHAT_START + b'"temperature": 1e999}', "temperature"),
    "nan": (CHAT_START + b'"temperature": NaN}', "temperature"),
    "infinity": (CHAT_START + b'"top_p": -Infinity}', "top_p"),
    "deep-nesting": (b'{"model": "tiny-chat", "messages": ' + b"[" * 30000 + b"]" * 30000 + b"}", None),
    "nested-within-reason": (b'{"model": "tiny-chat", "messages": ' + b"[" * 500 + b"]" * 500 + b"}", None),
    "lone-surrogate-model": (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', None),
    "lone-surrogate-field": (b'{"model": "tiny-chat", "\\udfff": 1, "messages": []}', None),
    "lone-surrogate-content": (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "a\\ud800"}]}', None),
}


@pytest.mark.parametrize(("raw", "param"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_but_valid_json_is_a_400_never_a_500_nor_a_reset(open_server: Server, raw: bytes, param: str | None):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        response = httpx.post(f"{open_server.url}{path}", content=raw, headers=JSON_HEADERS, timeout=30)
        assert response.status_code == 400, (path, response.text[:300])
        assert response.json()["error"]["type"] == "invalid_request_error"
        if path == "/v1/chat/completions":
            assert response.json()["error"]["param"] == param, response.text[:300]
    assert httpx.get(f"{open_server.url}/health", timeout=10).status_code == 200


def test_an_error_echoing_a_lone_surrogate_is_encoded_safely():
    from sparkgpt.serve.api import error_response
    from sparkgpt.serve.protocol import APIError

    response = error_response(APIError(404, "The model '\ud800' does not exist.", param="model"))
    assert json.loads(response.body)["error"]["message"] == "The model '\ud800' does not exist."
    assert response.body.isascii()


# ---- 3. templates and tokenisation off the event loop ---------------------------------------------------------------


def test_chat_template_and_tokenisation_run_off_the_event_loop(tokenizer: Tokenizer):
    from starlette.testclient import TestClient

    from sparkgpt.serve.api import create_app

    calls: list[tuple[str, bool]] = []
    engine = Engine(tiny_lm(tokenizer, max_seq_len=64), max_slots=1).start()
    lm = engine.lm
    for name in ("chat_prompt", "encode"):
        original = getattr(lm, name)

        def spy(*args, original=original, name=name):
            calls.append((name, asyncio._get_running_loop() is not None))  # inside the loop's thread?
            return original(*args)

        setattr(lm, name, spy)
    with TestClient(create_app("m", lambda: engine)) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        reply = client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "max_tokens": 2})
        assert reply.status_code == 200
        reply = client.post("/v1/completions", json={"model": "m", "prompt": "Hello there", "max_tokens": 2})
        assert reply.status_code == 200
    assert {name for name, _ in calls} == {"chat_prompt", "encode"}
    assert not any(on_loop for _, on_loop in calls), calls


# ---- 4. a non-streaming client that leaves ------------------------------------------------------------------------


def test_a_non_streaming_client_that_leaves_is_noticed_while_tokens_flow(open_server: Server):
    server = open_server
    aborted = server.metric("sparkgpt_requests_aborted_total")
    generated = server.metric("sparkgpt_generation_tokens_total")
    body = json.dumps(chat_body(max_tokens=4000)).encode()
    sock = connect(server)
    sock.sendall(head(server, "POST", "/v1/chat/completions",
                      {"Content-Type": "application/json", "Content-Length": str(len(body))}) + body)
    deadline = time.monotonic() + 30
    while server.metric("sparkgpt_active_sequences") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("sparkgpt_active_sequences") == 1
    time.sleep(0.3)  # tokens flow: events keep arriving, the wait never idles
    sock.close()
    left = time.monotonic()
    while server.metric("sparkgpt_active_sequences") and time.monotonic() < left + 15:
        time.sleep(0.05)
    assert server.metric("sparkgpt_active_sequences") == 0
    assert server.metric("sparkgpt_requests_aborted_total") == aborted + 1  # aborted, not run to max_tokens
    assert time.monotonic() - left < 10
    assert server.metric("sparkgpt_generation_tokens_total") == generated  # nobody got them


# ---- 5. slow clients, connections and headers -----------------------------------------------------------------------


def test_partial_headers_get_408_and_are_closed(open_server: Server):
    with connect(open_server) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{open_server.port}\r\n".encode())
        started = time.monotonic()
        status, body = read_response(sock)
        assert status == 408 and "error" in json.loads(body)
        assert time.monotonic() - started < RECEIVE_TIMEOUT + SLACK
        assert closed_by_server(sock)


def test_an_idle_connection_is_closed(open_server: Server):
    with connect(open_server) as sock:
        started = time.monotonic()
        status, _ = read_response(sock)
        assert status == 408 and time.monotonic() - started < RECEIVE_TIMEOUT + SLACK
        assert closed_by_server(sock)


def test_a_trickled_body_is_cut_at_the_deadline(open_server: Server):
    body = json.dumps(chat_body(user="u" * 2000)).encode()
    with connect(open_server) as sock:
        sock.sendall(head(open_server, "POST", "/v1/chat/completions",
                          {"Content-Type": "application/json", "Content-Length": str(len(body))}))
        started = time.monotonic()
        sent = 0
        with pytest.raises((BrokenPipeError, ConnectionResetError, ConnectionError)):
            while time.monotonic() - started < RECEIVE_TIMEOUT + SLACK:
                sock.sendall(body[sent:sent + 8])  # 8 bytes every 0.2 s: 8 minutes for this body
                sent += 8
                time.sleep(0.2)
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    status, _ = read_response(sock)
                    assert status == 408
                    raise ConnectionError("answered 408")
        assert time.monotonic() - started < RECEIVE_TIMEOUT + SLACK


def test_a_keep_alive_connection_serves_several_requests_within_the_deadline(open_server: Server):
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        for _ in range(3):  # the receipt deadline is per request, not per connection
            assert client.get("/health").status_code == 200
            time.sleep(RECEIVE_TIMEOUT * 0.6)


@pytest.mark.parametrize("headers", [
    {"X-Big": "a" * 100_000},
    {f"X-Many-{i}": "1" for i in range(2000)},
    {f"X-Some-{i}": "1" for i in range(150)},
], ids=["100KB-header", "2000-headers", "150-headers"])
def test_oversized_headers_get_431(open_server: Server, headers: dict[str, str]):
    with connect(open_server) as sock:
        sock.sendall(head(open_server, "GET", "/health", headers))
        status, body = read_response(sock)
        assert status == 431 and json.loads(body)["error"]["message"]
        assert closed_by_server(sock)
    with connect(open_server) as sock:  # trickled in pieces, the same
        request = head(open_server, "GET", "/health", headers)
        with pytest.raises((BrokenPipeError, ConnectionResetError, ConnectionError)):
            for start in range(0, len(request), 4096):
                sock.sendall(request[start:start + 4096])
                time.sleep(0.002)
            status, _ = read_response(sock)
            assert status == 431
            raise ConnectionError("answered 431")


def test_connections_past_the_cap_are_refused_at_once(open_server: Server):
    sockets = []
    try:
        for _ in range(MAX_CONNECTIONS + 2):
            sockets.append(connect(open_server))
        started = time.monotonic()
        answered: dict[int, int] = {}
        while time.monotonic() - started < RECEIVE_TIMEOUT * 0.75 and not answered:
            readable, _, _ = select.select(sockets, [], [], 0.1)
            for sock in readable:
                answered[sockets.index(sock)] = read_response(sock)[0]
        assert answered and set(answered.values()) == {503}, answered
        assert min(answered) >= MAX_CONNECTIONS - 2  # the first ones were accepted; the last ones refused
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{open_server.url}/health", timeout=10).status_code == 200


# ---- 6. the Host / Content-Type guard of a loopback server without a key ------------------------------------------


def test_loopback_without_key_answers_only_loopback_hosts_and_json_posts(tokenizer: Tokenizer):
    from starlette.testclient import TestClient

    from sparkgpt.serve.api import create_app

    def load_engine() -> Engine:
        return Engine(tiny_lm(tokenizer, max_seq_len=64), max_slots=1).start()

    body = {"model": "m", "messages": USER, "max_tokens": 1}
    with TestClient(create_app("m", load_engine, host="127.0.0.1", port=8000)) as client:
        deadline = time.monotonic() + 30
        while client.get("/health", headers={"Host": "localhost"}).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost", "LOCALHOST:8000"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
            assert client.post("/v1/chat/completions", json=body, headers={"Host": host}).status_code == 200
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example:8000", "localhost:9000",
                     "[::2]:8000"):
            response = client.get("/v1/models", headers={"Host": host})
            assert response.status_code == 403 and response.json()["error"]["code"] == "host_not_allowed", host
            assert client.post("/v1/chat/completions", json=body, headers={"Host": host}).status_code == 403
        local = {"Host": "127.0.0.1:8000"}
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             None):
            headers = local if content_type is None else {**local, "Content-Type": content_type}
            response = client.post("/v1/chat/completions", content=json.dumps(body), headers=headers)
            assert response.status_code == 415, content_type
            assert response.json()["error"]["code"] == "unsupported_media_type"
        assert client.post("/v1/chat/completions", content=json.dumps(body),
                           headers={**local, "Content-Type": "application/json; charset=utf-8"}).status_code == 200
        page = client.get("/", headers=local)
        assert page.status_code == 200
        script = client.get("/static/app.js", headers=local).text
        assert '"Content-Type": "application/json"' in script  # the chat page posts JSON: it keeps working

    # With a key, the key protects: any Host; bound elsewhere, the same (a proxy may name it anything).
    for options in ({"host": "127.0.0.1", "port": 8000, "api_key": "k"}, {"host": "0.0.0.0", "port": 8000}):
        with TestClient(create_app("m", load_engine, **options)) as client:
            headers = {"Host": "evil.example", "Authorization": "Bearer k"}
            assert client.get("/v1/models", headers=headers).status_code == 200


def test_the_real_loopback_server_refuses_cross_site_requests(open_server: Server):
    url = f"{open_server.url}/v1/chat/completions"
    body = json.dumps(chat_body())
    assert httpx.post(url, content=body, headers={"Content-Type": "text/plain"}, timeout=30).status_code == 415
    rebound = httpx.post(url, content=body, timeout=30,
                         headers={"Content-Type": "application/json", "Host": f"attacker.example:{open_server.port}"})
    assert rebound.status_code == 403
    assert httpx.get(f"{open_server.url}/", timeout=10).status_code == 200
    assert httpx.post(url, content=body, headers=JSON_HEADERS, timeout=60).status_code == 200
