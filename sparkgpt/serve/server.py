"""Running the server: the engine built in the background, the app (`api.py`) in front of it, uvicorn serving it."""

from __future__ import annotations

import asyncio
import http
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from sparkgpt.errors import SparkGPTError
from sparkgpt.lm import LM
from sparkgpt.model.vision import ImageText
from sparkgpt.model.whisper import Whisper
from sparkgpt.rag.index import Index
from sparkgpt.serve.api import DEFAULT_MAX_BODY_BYTES, create_app
from sparkgpt.serve.embeddings import Pooler
from sparkgpt.serve.engine import Engine
from sparkgpt.serve.images import ImageChat
from sparkgpt.serve.transcription import Transcriber

DEFAULT_CONTEXT = 4096  # tokens per slot at most by default (each slot holds a whole sequence): bounds memory


# ---- what uvicorn does not limit --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits on what a client may hold open (uvicorn itself has none of these but the keep-alive timeout):
    `max_connections` open at once (one more is answered 503 and closed), `receive_timeout` seconds for a request
    to arrive whole, headers and body, from its first byte (or from the connection's opening: an idle socket
    counts too; a slowloris's trickle is answered 408 and closed), `max_header_bytes` of request line and headers
    and `max_headers` header fields (431)."""

    max_connections: int = 512
    receive_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100


class _LimitedConnection(h11.Connection):
    """h11's connection refusing a request whose headers are over the limits, however they arrived."""

    def __init__(self, limits: ConnectionLimits) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.limits = limits
        self.refusal: tuple[int, str] | None = None  # what to answer instead of uvicorn's plain 400

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as error:
            if error.error_status_hint == 431:  # headers still incomplete past max_header_bytes
                self.refusal = (431, f"The request's headers are larger than {self.limits.max_header_bytes} bytes.")
            raise
        if isinstance(event, h11.Request):
            size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if len(event.headers) > self.limits.max_headers:
                self.refusal = (431, f"The request has {len(event.headers)} header fields; at most "
                                f"{self.limits.max_headers} are accepted.")
            elif size > self.limits.max_header_bytes:
                self.refusal = (431, f"The request's headers are larger than {self.limits.max_header_bytes} bytes.")
            if self.refusal is not None:
                raise h11.RemoteProtocolError(self.refusal[1], error_status_hint=431)
        return event


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with `ConnectionLimits` (the class attribute `limits`, set by `limited_protocol`).
    Its refusals are OpenAI-shaped JSON errors, each closing the connection."""

    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _LimitedConnection(self.limits)
        self.receipt: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.refuse(503, f"This server holds {self.limits.max_connections} connections, the most it accepts; "
                        "try again later.")
            return
        self.arm_receipt()

    def data_received(self, data: bytes) -> None:
        if self.receipt is None and self.conn.their_state is h11.IDLE:
            self.arm_receipt()  # a new request begins on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self.disarm_receipt()  # the request arrived whole (or the connection is ending)

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_receipt()
        super().connection_lost(exc)

    def arm_receipt(self) -> None:
        self.disarm_receipt()
        self.receipt = self.loop.call_later(self.limits.receive_timeout, self.receipt_expired)

    def disarm_receipt(self) -> None:
        if self.receipt is not None:
            self.receipt.cancel()
            self.receipt = None

    def receipt_expired(self) -> None:
        self.receipt = None
        if self.transport.is_closing():
            return
        responding = self.conn.their_state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_started
        if responding:  # the app answered already (say 413) while the body trickles: just end it
            self.transport.close()
        else:
            self.refuse(408, f"The request did not arrive whole within {self.limits.receive_timeout:g} s.")

    def send_400_response(self, msg: str) -> None:
        if self.conn.refusal is None:
            super().send_400_response(msg)
        else:
            self.refuse(*self.conn.refusal)

    def refuse(self, status: int, message: str) -> None:
        """Answer `status` with an error in OpenAI's shape and close the connection; the request, if any, never
        reaches the app (the app's wait for its body, if it started, ends as a disconnect)."""
        error_type = "service_unavailable" if status == 503 else "invalid_request_error"
        body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": None}}).encode()
        head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.disarm_receipt()
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def limited_protocol(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """The protocol class for uvicorn's `http` option, holding `limits`."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


def start_serving(lm: LM, max_slots: int = 8, max_queue: int = 64, context: int | None = None,
                  prefill_chunk: int = 256, prefix_cache_bytes: int | None = None,
                  ) -> Engine | Pooler | Transcriber | ImageChat:
    """What serves `lm`: a running Engine for a model that generates (it also embeds, with the engine's model),
    for an encoder (minilm-l6), which cannot generate, a Pooler alone: /v1/embeddings only; for Whisper a
    Transcriber: /v1/audio/transcriptions only; for an image-to-text model an ImageChat: chat about images only."""
    if isinstance(lm.model, Whisper):
        return Transcriber(lm)
    if isinstance(lm.model, ImageText):
        return ImageChat(lm)
    if getattr(lm.config, "architecture", "decoder") == "encoder":
        return Pooler(lm)
    engine = Engine(lm, max_slots=max_slots, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    context=context or min(lm.config.max_seq_len, DEFAULT_CONTEXT),
                    prefix_cache_bytes=prefix_cache_bytes)
    return engine.start()


_FLUSH_SECONDS = 5  # after the drain: time for the last chunks and [DONE] to reach the clients


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM/SIGINT drains the engine before uvicorn's own shutdown starts."""

    def __init__(self, config: uvicorn.Config, engine: Callable[[], Engine | None], shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine = self.engine()
        if self._draining or engine is None or not engine.alive:
            super().handle_exit(sig, frame)  # a second signal, or nothing to drain: exit now
            return
        self._draining = True
        engine.drain(self.shutdown_timeout)
        # The listener stays open meanwhile, so new requests get an answer (503) rather than a refused connection.
        threading.Thread(target=self._exit_when_drained, args=(engine, sig, frame), name="sparkgpt-drain",
                         daemon=True).start()

    def _exit_when_drained(self, engine: Engine, sig: int, frame: FrameType | None) -> None:
        deadline = time.monotonic() + self.shutdown_timeout + 1  # the engine ends what is left at the timeout
        while engine.busy and engine.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        super().handle_exit(sig, frame)


def serve(
    load_lm: Callable[[], LM], model_name: str, host: str = "127.0.0.1", port: int = 8000,
    api_key: str | None = None, max_slots: int = 8, max_queue: int = 64, context: int | None = None,
    prefill_chunk: int = 256, threads: int | None = None, log_level: str = "info", index: Index | None = None,
    k: int = 4, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, limits: ConnectionLimits | None = None,
    shutdown_timeout: float = 30.0, prefix_cache_bytes: int | None = None,
) -> None:
    """Serve the LM that `load_lm` returns, as `model_name`, over the OpenAI-compatible HTTP API (with the chat
    page at /) on http://host:port until interrupted.

    The port is bound at once: /health answers 503 while the model loads in a background thread, 200 once the
    engine runs. max_slots sequences are decoded together, max_queue requests may wait for a slot, each slot holds
    `context` tokens (default: the model's context, at most 4096), `prefix_cache_bytes` keeps finished requests'
    keys/values for later prompts (`Engine`), `threads` sets torch's CPU threads. An encoder
    model serves /v1/embeddings only. With an `index` (`Index.load`), chat replies are grounded in its `k` best
    chunks and return them as "sources". Raises SparkGPTError when the model fails to load (the server then shuts
    down) or the port cannot be bound.

    Hostile clients meet limits: a body over `max_body_bytes` is a 413, and `limits` (`ConnectionLimits`) caps
    connections, header size and count, and the time a request may take to arrive. Bound to loopback without an
    `api_key`, only loopback Host headers and JSON POSTs are answered (no DNS rebinding, no cross-site form).

    SIGTERM (or Ctrl-C) drains: new requests get 503 and /health says "draining" while the requests in flight run
    for up to `shutdown_timeout` seconds; any still running then end with a `server_shutting_down` error (a stream
    with its error event and [DONE]); then the server exits. A second signal exits at once."""

    def load_engine() -> Engine | Pooler | Transcriber | ImageChat:
        if threads is not None:
            torch.set_num_threads(threads)
        lm = load_lm()
        if index is not None and getattr(lm.config, "architecture", "decoder") == "encoder":
            raise SparkGPTError(f"--index grounds chat replies, and {model_name} is an encoder model, which cannot "
                                "chat; serve a decoder model with --index")
        if index is not None and isinstance(lm.model, ImageText):  # it answers about images, not from documents
            raise SparkGPTError(f"--index grounds chat replies in text, and {model_name} is an image-to-text model; "
                                "serve a decoder model with --index")
        served = start_serving(lm, max_slots=max_slots, max_queue=max_queue, context=context,
                               prefill_chunk=prefill_chunk, prefix_cache_bytes=prefix_cache_bytes)
        if isinstance(served, Engine):
            what = f"{max_slots} slots of {served.context} tokens, {served.device}"
            if index is not None:
                what += f", grounded in {index.directory} ({len(index)} chunks, k={k})"
        elif isinstance(served, Transcriber):
            what = f"speech to text only: Whisper, {served.device}"
        elif isinstance(served, ImageChat):
            what = f"chat about images only: an image-to-text model, {served.device}"
        else:
            what = f"embeddings only: an encoder, {served.device}"
        print(f"sparkgpt: serving {model_name} on http://{host}:{port} ({what})", file=sys.stderr, flush=True)
        return served  # `lm` goes now: the engine keeps its own model, not the caller's

    server: uvicorn.Server | None = None

    def stop_server(message: str) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(model_name, load_engine, api_key=api_key, on_load_error=stop_server, index=index, k=k,
                     max_body_bytes=max_body_bytes, host=host, port=port)
    limits = limits or ConnectionLimits()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=_FLUSH_SECONDS,
                            http=limited_protocol(limits), timeout_keep_alive=5,
                            h11_max_incomplete_event_size=limits.max_header_bytes)
    server = DrainingServer(config, lambda: app.state.serve.engine, shutdown_timeout)
    server.run()
    if app.state.serve.load_error is not None:
        raise SparkGPTError(app.state.serve.load_error)
    if not server.started:
        raise SparkGPTError(f"could not serve on {host}:{port} (is the port free?)")
