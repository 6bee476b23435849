"""The HTTP API: OpenAI-compatible routes, Prometheus metrics and the chat page.

This layer only translates: a request's JSON body becomes a prompt and SamplingParams (`protocol.py`) for
`Engine.submit`, engine events become a response or server-sent events, and every bad input becomes an error in
OpenAI's shape, checked before the first byte of a stream is sent. `server.py` runs it.

/v1/embeddings pools the served model's vectors (`embeddings.py`), and with an index chat replies are grounded in
it (`grounding.py`); a served Whisper model answers /v1/audio/transcriptions alone (`transcription.py`), and a
served image-to-text model chat completions about images alone (`images.py`). These block on a model's forward,
so they run in a worker thread, one call at a time, never on the event loop nor in the engine's thread:
generations in flight go on meanwhile. Chat templates and tokenisation run in a second worker
thread, so that they neither stall the loop nor wait behind a forward.

`RequestGuard` stands before every route: a body over `max_body_bytes` is a 413 (a larger Content-Length at once,
else as soon as the bytes read pass the limit: never buffered first), and a server bound to loopback without an
API key answers only Host headers naming loopback (no DNS rebinding) and only application/json POSTs (a web page's
cross-site form or `text/plain` fetch cannot start a generation; the one multipart form taken, an audio upload,
is refused when a browser's Origin header comes with it). The limits on connections, headers and the time
a request may take to arrive are `server.py`'s, in uvicorn's protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sparkgpt import hardware
from sparkgpt.errors import SparkGPTError
from sparkgpt.generate import is_int
from sparkgpt.rag.index import Hit, Index
from sparkgpt.serve.embeddings import Pooler
from sparkgpt.serve.engine import (
    ChoiceEvent,
    Engine,
    EngineDead,
    EngineRequest,
    QueueFull,
    ShuttingDown,
    TokenLogprob,
)
from sparkgpt.serve.grounding import Grounding
from sparkgpt.serve.images import ImageChat, ImageChatCall, chat_chunk, chat_completion, usage_chunk
from sparkgpt.serve.metrics import Metrics, MetricsMiddleware
from sparkgpt.serve.protocol import (
    CHAT_FIELDS,
    COMPLETION_DEFAULT_MAX_TOKENS,
    COMPLETION_FIELDS,
    EMBEDDING_FIELDS,
    APIError,
    Call,
    chat_logprobs,
    chat_prompt_ids,
    check_embedding_options,
    check_fields,
    check_model,
    completion_logprobs,
    embedding_response,
    engine_failure,
    invalid,
    parse_body,
    parse_embedding_inputs,
    parse_messages,
    parse_prompts,
    parse_tools,
    plain_tool_history,
    prepare_call,
    templates_tools,
    tool_call_entry,
    tool_messages,
    usage,
)
from sparkgpt.serve.tool_calls import ToolCallReply, parse_tool_calls, streamable
from sparkgpt.serve.transcription import TRANSCRIPTIONS_PATH, Transcriber, read_form, transcription_response
from sparkgpt.tasks.grounded import cite

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body over this is a 413 (4 MiB: a 128k-token prompt fits)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # the Host names a loopback server without a key answers
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request looks whether its client is still there


class ErrorJSONResponse(JSONResponse):
    """JSON in ASCII: an error may echo the client's text, and a lone surrogate ("\\ud800") has no UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.status == 413:  # the rest of the body is not read: this connection ends with the answer
        headers["Connection"] = "close"
    return ErrorJSONResponse(error.body(), status_code=error.status, headers=headers or None)


def engine_dead(engine: Engine) -> APIError:
    """The 503 of a server whose engine thread has died: /health says so too."""
    return APIError(503, f"the engine has stopped: {engine.error or 'it is not running'}",
                    error_type="service_unavailable", code="engine_dead")


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def loopback_host_check(port: int | None) -> Callable[[str], bool]:
    """Whether a Host header names this loopback server: 127.0.0.1, localhost or [::1], with the port served (or
    none; any port when it is not known). Any other name may be a DNS-rebinding page's."""
    def allowed(header: str) -> bool:
        header = header.strip().lower()
        if header.startswith("["):
            name, _, given = header.partition("]")
            name, given = name + "]", given.removeprefix(":")
        else:
            name, _, given = header.partition(":")
        return name in LOOPBACK_NAMES and (not given or not port or given == str(port))
    return allowed


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than this server accepts ({limit} bytes at most; see "
                         "--max-body-bytes).", code="request_too_large")


class RequestGuard:
    """Pure ASGI, before every route: the body limit, and when `host_allowed` is given (loopback, no key) the Host
    allow-list and the Content-Type check on POST."""

    def __init__(self, app: Any, max_body_bytes: int, host_allowed: Callable[[str], bool] | None) -> None:
        self.app, self.max_body_bytes, self.host_allowed = app, max_body_bytes, host_allowed

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = None
        if self.host_allowed is not None and not self.host_allowed(headers.get("host", "")):
            refusal = APIError(403, "This server is bound to loopback without an API key and answers only requests "
                               "addressed to 127.0.0.1, localhost or [::1] (the Host header).", code="host_not_allowed")
        elif (self.host_allowed is not None and scope["method"] == "POST"
              and not self.accepted_type(scope["path"], headers)):
            refusal = APIError(415, "Send the request body as JSON with 'Content-Type: application/json' (audio to "
                               f"{TRANSCRIPTIONS_PATH} as multipart/form-data, not from a web page).",
                               code="unsupported_media_type")
        else:
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body_bytes:
                refusal = BodyTooLarge(self.max_body_bytes)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # the route's read raises; the APIError handler answers 413
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        # A client that leaves (or is cut off at the receipt deadline) before its body is in: nothing to answer.
        with contextlib.suppress(ClientDisconnect):
            await self.app(scope, limited_receive, send)

    @staticmethod
    def accepted_type(path: str, headers: Headers) -> bool:
        """JSON, or an audio upload's multipart form that no web page sent (a browser's POST carries Origin)."""
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        upload = path == TRANSCRIPTIONS_PATH and content_type == "multipart/form-data" and "origin" not in headers
        return content_type == "application/json" or upload


# ---- state ------------------------------------------------------------------------------------------------------


@dataclass
class ServeState:
    model_name: str
    api_key: str | None
    engine: Engine | None = None    # None while loading, and for a model that cannot generate (an encoder)
    pooler: Pooler | None = None    # set once the model is loaded: every served text model embeds
    transcriber: Transcriber | None = None  # set instead of both for a Whisper model
    images: ImageChat | None = None  # set instead of all three for an image-to-text model
    grounding: Grounding | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)
    blocking: ThreadPoolExecutor | None = None  # the worker thread for embeddings and retrieval
    text: ThreadPoolExecutor | None = None      # the worker thread for chat templates and tokenisation

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine)

    def _not_ready(self) -> APIError:
        message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
        return APIError(503, message, error_type="service_unavailable", code="model_loading")

    def _speech_only(self) -> APIError:
        return invalid("model", f"The model '{self.model_name}' is a speech recognition model: it transcribes audio "
                       f"(POST {TRANSCRIPTIONS_PATH}) but neither generates nor embeds text.",
                       code="model_cannot_generate")

    def _images_only(self, code: str) -> APIError:
        return invalid("model", f"The model '{self.model_name}' is an image-to-text model: it answers chat "
                       "completions about images (POST /v1/chat/completions with an image_url content part) but "
                       "neither completes prompts nor embeds text.", code=code)

    def ready_engine(self) -> Engine:
        if self.engine is None:
            if self.transcriber is not None:
                raise self._speech_only()
            if self.images is not None:
                raise self._images_only("model_cannot_generate")
            if self.pooler is not None:
                raise invalid("model", f"The model '{self.model_name}' is an encoder: it embeds text "
                              "(POST /v1/embeddings) but cannot generate it. Serve a decoder model for chat and "
                              "completions.", code="model_cannot_generate")
            raise self._not_ready()
        if self.engine.error is not None:
            raise engine_dead(self.engine)
        return self.engine

    def ready_pooler(self) -> Pooler:
        if self.pooler is None:
            if self.images is not None:
                raise self._images_only("model_cannot_embed")
            raise self._speech_only() if self.transcriber is not None else self._not_ready()
        return self.pooler

    def ready_transcriber(self) -> Transcriber:
        if self.transcriber is None:
            if self.pooler is not None or self.images is not None:
                raise invalid("model", f"The model '{self.model_name}' is not a speech recognition model: "
                              f"{TRANSCRIPTIONS_PATH} needs a Whisper model (e.g. whisper-base).",
                              code="model_cannot_transcribe")
            raise self._not_ready()
        return self.transcriber

    async def run_blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in the worker thread, the event loop free meanwhile."""
        if self.blocking is None:
            raise APIError(503, "the server is shutting down", error_type="service_unavailable")
        call = functools.partial(_releasing, function, *args)
        return await asyncio.get_running_loop().run_in_executor(self.blocking, call)

    async def run_text(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in the text thread (templates, tokenisation): off the loop, never behind a forward."""
        if self.text is None:
            raise APIError(503, "the server is shutting down", error_type="service_unavailable")
        call = functools.partial(_releasing, function, *args)
        return await asyncio.get_running_loop().run_in_executor(self.text, call)


def _releasing(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)`, then this worker thread's OpenMP workers let go: while they idle, the engine thread's
    would sleep between its parallel regions (`hardware.release_idle_threads`)."""
    try:
        return function(*args)
    finally:
        hardware.release_idle_threads()


# ---- the app ---------------------------------------------------------------------------------------------------


def create_app(
    model_name: str, load_engine: Callable[[], Engine | Pooler | Transcriber | ImageChat], api_key: str | None = None,
    on_load_error: Callable[[str], None] | None = None, index: Index | None = None, k: int = 4,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, host: str | None = None, port: int | None = None,
) -> FastAPI:
    """The FastAPI app. The model loads in a background thread (`load_engine`), so /health answers 503 at once
    and 200 when the engine runs; `on_load_error` hears a failed load (the CLI then shuts the server down).

    `load_engine` gives a running Engine, or for a model that cannot generate (an encoder) a Pooler alone: that
    server embeds, and answers chat and completions with 400; for a Whisper model a Transcriber: that server
    answers /v1/audio/transcriptions alone; for an image-to-text model an ImageChat: that server answers chat
    completions about images alone. With an `index`, chat replies are grounded in its
    `k` best chunks for the last user message (its query embedder is loaded with the model).

    A body over `max_body_bytes` is a 413. `host` and `port` are the address served: bound to loopback without
    an `api_key`, only loopback Host headers and JSON POSTs are answered (`RequestGuard`)."""
    state = ServeState(model_name, api_key or None)
    if index is not None:
        if k < 1:
            raise SparkGPTError(f"k must be at least 1, got {k}")
        state.grounding = Grounding(index, k)

    def load() -> None:
        try:
            if state.grounding is not None:  # its query embedder loads (and is checked) now, not at the first question
                state.grounding.index.embedder  # noqa: B018
            served = load_engine()
            if isinstance(served, Engine):
                state.pooler = Pooler(served.lm, context=served.context)
                state.engine = served
            elif isinstance(served, Transcriber):
                state.transcriber = served
            elif isinstance(served, ImageChat):
                state.images = served
            else:
                state.pooler = served
        except Exception as error:
            state.load_error = str(error) if isinstance(error, SparkGPTError) else f"{type(error).__name__}: {error}"
            if on_load_error is not None:
                on_load_error(state.load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.blocking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparkgpt-blocking")
        state.text = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparkgpt-text")
        threading.Thread(target=load, name="sparkgpt-load", daemon=True).start()
        yield
        state.blocking.shutdown(wait=False, cancel_futures=True)
        state.text.shutdown(wait=False, cancel_futures=True)
        state.blocking = state.text = None
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="sparkgpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    guarded = host is not None and is_loopback(host) and state.api_key is None
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes,
                       host_allowed=loopback_host_check(port) if guarded else None)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # outermost: it counts the guard's refusals too

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, str(error.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(error).__name__}", error_type="server_error"))

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "Missing API key: send it as 'Authorization: Bearer KEY'.", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is not None and not state.engine.alive:  # its thread died (or was stopped)
            error = state.engine.error or "the engine is not running"
            return JSONResponse({"status": "error", "error": error}, status_code=503)
        if state.engine is not None and state.engine.draining:  # a load balancer takes it out of rotation
            return JSONResponse({"status": "draining", "error": "the server is shutting down"}, status_code=503)
        if state.pooler is not None or state.transcriber is not None or state.images is not None:
            return JSONResponse({"status": "ok", "model": state.model_name})
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorize(request)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "sparkgpt"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        authorize(request)
        if model_id != state.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        if state.images is not None:
            return await image_chat(state, state.images, parse_body(await request.body()))
        engine = state.ready_engine()
        body = parse_body(await request.body())
        check_fields(body, CHAT_FIELDS)
        check_model(body, state.model_name)
        messages = parse_messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens")
        max_tokens_param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, max_tokens_param = body.get("max_tokens"), "max_tokens"
        tools, _ = parse_tools(body)
        sources: list[Hit] | None = None
        try:  # the template and the tokenizer run in the text thread, off the event loop
            if state.grounding is None:
                prompt_ids = await state.run_text(chat_prompt_ids, engine.lm, messages, tools)
            else:
                grounding = state.grounding
                query = grounding.query(messages)
                hits = await state.run_blocking(grounding.search, query) if query is not None else []
                room = max_tokens if is_int(max_tokens) and max_tokens > 0 else 1
                plain = messages if templates_tools(engine.lm) else plain_tool_history(messages)
                prompt_ids, sources = await state.run_text(grounding.prompt, engine.lm,
                                                           tool_messages(plain, tools) if tools else plain,
                                                           hits, room, engine.context)
        except SparkGPTError as error:
            raise invalid("messages", str(error)) from None
        call = await state.run_text(prepare_call, engine, body, [prompt_ids], "messages", max_tokens,
                                    max_tokens_param, None)  # compiles any grammar: off the loop
        return await run_call(request, state, engine, call, chat=True, sources=sources)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        engine = state.ready_engine()
        body = parse_body(await request.body())
        check_fields(body, COMPLETION_FIELDS)
        check_model(body, state.model_name)
        prompts = await state.run_text(parse_prompts, engine, body.get("prompt"))  # tokenises: off the loop
        call = await state.run_text(prepare_call, engine, body, prompts, "prompt", body.get("max_tokens"),
                                    "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)  # echo decodes: off the loop
        return await run_call(request, state, engine, call, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        authorize(request)
        pooler = state.ready_pooler()
        body = parse_body(await request.body())
        check_fields(body, EMBEDDING_FIELDS)
        check_model(body, state.model_name)
        encoding_format = check_embedding_options(body, pooler)

        def embed() -> tuple[Any, Any]:  # tokenizing 2048 inputs takes a while too: all of it off the loop
            call = parse_embedding_inputs(pooler, body["input"], encoding_format)
            return call, pooler.embed(call.inputs)

        call, vectors = await state.run_blocking(embed)
        state.metrics.prompt_tokens.inc(call.tokens)
        return JSONResponse(embedding_response(call, vectors, state.model_name))

    @app.post(TRANSCRIPTIONS_PATH)
    async def transcriptions(request: Request) -> Response:
        authorize(request)
        transcriber = state.ready_transcriber()
        form = await read_form(request, state.model_name)
        text = await state.run_blocking(transcriber.transcribe, form)
        return transcription_response(text, form.response_format)

    return app


# ---- running a call ---------------------------------------------------------------------------------------------


class EngineCall:
    """The engine requests of one API call and the asyncio queue their events arrive on (from the engine thread)."""

    def __init__(self, engine: Engine, call: Call) -> None:
        self.engine, self.call = engine, call
        self.events: asyncio.Queue[tuple[int, list[ChoiceEvent]]] = asyncio.Queue()
        self.requests: list[EngineRequest] = []
        self.unfinished = len(call.prompts) * call.n
        loop = asyncio.get_running_loop()
        try:
            for k, prompt in enumerate(call.prompts):
                def sink(events: list[ChoiceEvent], k: int = k) -> None:
                    loop.call_soon_threadsafe(self.events.put_nowait, (k, events))
                self.requests.append(engine.submit(prompt, call.params, sink, call.n, logprobs=call.logprobs,
                                                   prompt_logprobs=call.prompt_logprobs,
                                                   score_only=call.score_only, grammar=call.grammar))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for request in self.requests:
            self.engine.abort(request)

    def prompt_of(self, index: int) -> list[int]:
        """The prompt of choice `index` (across the call)."""
        return self.call.prompts[index // self.call.n]

    async def next_events(self) -> list[tuple[int, ChoiceEvent]]:
        """The next batch of (choice index across the call, event); counts finished choices down."""
        k, events = await self.events.get()
        out = []
        for event in events:
            if event.finish_reason is not None or event.error is not None:
                self.unfinished -= 1
            out.append((k * self.call.n + event.index, event))
        return out


async def run_call(request: Request, state: ServeState, engine: Engine, call: Call, chat: bool,
                   sources: list[Hit] | None = None) -> Response:
    """Submit a call and answer it; `sources` (a grounded chat) go with the reply: a whole reply's "sources"
    field, or a stream's first chunk's."""
    try:
        engine_call = EngineCall(engine, call)
    except QueueFull as error:
        state.metrics.rejected.inc()
        raise APIError(429, str(error), error_type="rate_limit_error", code="queue_full") from None
    except EngineDead:
        raise engine_dead(engine) from None
    except ShuttingDown as error:
        raise APIError(503, str(error), error_type="service_unavailable", code="server_shutting_down") from None
    except SparkGPTError as error:
        raise invalid(None, str(error)) from None
    kind = "chatcmpl" if chat else "cmpl"
    response_id = f"{kind}-{uuid.uuid4().hex}"
    started = time.perf_counter()
    if call.stream:
        stream = sse_stream(state, engine_call, response_id, chat, started, sources)
        return EngineStreamResponse(stream, on_close=lambda: finish_stream(state, engine_call),
                                    media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(request, state, engine_call, response_id, chat, started, sources)


def finish_stream(state: ServeState, engine_call: EngineCall) -> None:
    if engine_call.unfinished > 0:  # the client went away mid-stream: free its slots now
        state.metrics.aborted.inc()
        engine_call.abort()


class EngineStreamResponse(StreamingResponse):
    """A stream that aborts its engine requests however it ends (a disconnect cancels it; `finally` still runs)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def collect(request: Request, state: ServeState, engine_call: EngineCall, response_id: str, chat: bool,
                  started: float, sources: list[Hit] | None = None) -> JSONResponse:
    """Wait for every choice; abort if the client disconnects while waiting: looked at every DISCONNECT_POLL_S,
    whether tokens flow or not."""
    call = engine_call.call
    count = len(call.prompts) * call.n
    texts, reasons, tokens = [""] * count, [None] * count, [0] * count
    sampled: list[list[TokenLogprob]] = [[] for _ in range(count)]
    prompt_scores: list[list[TokenLogprob | None] | None] = [None] * count
    first_token = True
    next_look = time.monotonic() + DISCONNECT_POLL_S
    while engine_call.unfinished > 0:
        if time.monotonic() >= next_look:
            if await request.is_disconnected():
                state.metrics.aborted.inc()
                engine_call.abort()
                return JSONResponse({}, status_code=499)  # nobody is listening; the status is for the logs
            next_look = time.monotonic() + DISCONNECT_POLL_S
        try:
            batch = await asyncio.wait_for(engine_call.next_events(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue
        for index, event in batch:
            if event.error is not None:
                engine_call.abort()
                raise engine_failure(event)
            if first_token and event.text:
                state.metrics.time_to_first_token.observe(time.perf_counter() - started)
                first_token = False
            texts[index] += event.text
            tokens[index] = event.completion_tokens
            reasons[index] = event.finish_reason
            sampled[index] += event.logprobs
            if event.prompt_logprobs is not None:
                prompt_scores[index] = event.prompt_logprobs
    prompt_tokens = sum(len(p) for p in call.prompts)
    completion_tokens = sum(tokens)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    state.metrics.generation_tokens.inc(completion_tokens)
    tokenizer = engine_call.engine.lm.tokenizer
    if chat:
        choices = []
        for i in range(count):
            message: dict[str, Any] = {"role": "assistant", "content": texts[i]}
            reply = tool_call_reply(call, texts[i], reasons[i])
            if reply is not None:
                message, reasons[i] = {"role": "assistant", "content": reply.content,
                                       "tool_calls": [tool_call_entry(c) for c in reply.calls]}, "tool_calls"
            if sources is not None and message["content"] is not None:
                # citations of sources it was not shown go; one that uses a source's words cites it
                message["content"] = cite(message["content"], sources)
            choices.append({"index": i, "message": message, "finish_reason": reasons[i],
                            "logprobs": None if call.logprobs is None else chat_logprobs(tokenizer, sampled[i])})
    else:
        choices = []
        for i in range(count):
            logprobs = None
            if call.logprobs is not None:
                entries, ids = sampled[i], [entry.token for entry in sampled[i]]
                if prompt_scores[i] is not None:
                    entries, ids = [*prompt_scores[i], *entries], [*engine_call.prompt_of(i), *ids]
                logprobs, _ = completion_logprobs(tokenizer, ids, entries)
            echo = "" if call.echo_texts is None else call.echo_texts[i // call.n]
            choices.append({"index": i, "text": echo + texts[i], "logprobs": logprobs, "finish_reason": reasons[i]})
    return JSONResponse({
        "id": response_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
        "model": state.model_name, "choices": choices,
        **({} if sources is None else {"sources": [hit.to_json() for hit in sources]}),
        "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None,
    })


def tool_call_reply(call: Call, text: str, reason: str | None) -> ToolCallReply | None:
    """The tool calls a chat choice's reply makes, read when the request lets it call tools (tool_choice "auto",
    "required" or a named function) and the reply ran to its end; None for text, or a reply cut short by
    max_tokens, which stays text."""
    if not call.tools or reason != "stop":
        return None
    return parse_tool_calls(text, call.tools)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_stream(state: ServeState, engine_call: EngineCall, response_id: str, chat: bool,
                     started: float, sources: list[Hit] | None = None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending in `data: [DONE]`; a grounded chat's sources ride on
    the first chunk (a "sources" field beside "choices").

    A chat that may call tools streams its text until a call may begin (`tool_calls.streamable`) and holds the rest
    to the end: then the calls it makes go out as one `tool_calls` delta (after any text around them), or, if it
    makes none, the held text goes out as content."""
    call = engine_call.call
    count = len(call.prompts) * call.n
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    usage_field = {"usage": None} if call.include_usage else {}
    tokenizer = engine_call.engine.lm.tokenizer

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse({"id": response_id, "object": obj, "created": created, "model": state.model_name,
                    "system_fingerprint": None, "choices": choices, **extra, **usage_field})

    def delta_chunk(index: int, delta: dict[str, Any], entries: list[TokenLogprob]) -> str:
        logprobs = None if call.logprobs is None else chat_logprobs(tokenizer, entries)
        return chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])

    if chat:
        grounded = {} if sources is None else {"sources": [hit.to_json() for hit in sources]}
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(count)], **grounded)
    tokens = [0] * count
    texts = [""] * count  # each chat choice's reply so far
    sent = [0] * count    # how much of it has gone out as content; the rest may be a tool call
    held_logprobs: list[list[TokenLogprob]] = [[] for _ in range(count)]  # they go out with their tokens' last text
    offsets = [0] * count  # each completion choice's text offset so far (legacy logprobs' text_offset)
    echoed = [call.echo_texts is None] * count
    first_token = True
    while engine_call.unfinished > 0:
        for index, event in await engine_call.next_events():
            if event.error is not None:
                engine_call.abort()
                failure = engine_failure(event)
                yield sse(failure.body())
                yield sse("[DONE]")
                return
            tokens[index] = event.completion_tokens
            if first_token and event.text:
                state.metrics.time_to_first_token.observe(time.perf_counter() - started)
                first_token = False
            if chat:
                reply_text = texts[index] = texts[index] + event.text
                held_logprobs[index] += event.logprobs
                if event.finish_reason is None:
                    ready = streamable(reply_text) if call.tools else len(reply_text)
                    whole = ready == len(reply_text)
                    if ready > sent[index] or (whole and held_logprobs[index]):
                        yield delta_chunk(index, {"content": reply_text[sent[index]:ready]},
                                          held_logprobs[index] if whole else [])
                        sent[index] = ready
                        if whole:
                            held_logprobs[index] = []
                    continue
                rest, reason = reply_text[sent[index]:], event.finish_reason
                reply = tool_call_reply(call, rest, reason)  # what went out holds no call: the rest has all
                if reply is None:
                    if rest or held_logprobs[index]:
                        yield delta_chunk(index, {"content": rest}, held_logprobs[index])
                else:
                    if reply.content is not None:
                        yield delta_chunk(index, {"content": reply.content}, [])
                    calls = [{"index": i, **tool_call_entry(c)} for i, c in enumerate(reply.calls)]
                    yield delta_chunk(index, {"tool_calls": calls}, held_logprobs[index])
                    reason = "tool_calls"
                yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])
                continue
            text, entries, ids = event.text, event.logprobs, [entry.token for entry in event.logprobs]
            if not echoed[index]:  # a choice's first chunk starts with its prompt (and its prompt's logprobs)
                echoed[index] = True
                text = call.echo_texts[index // call.n] + text
                if event.prompt_logprobs is not None:
                    entries, ids = [*event.prompt_logprobs, *entries], [*engine_call.prompt_of(index), *ids]
            logprobs = None
            if call.logprobs is not None:
                logprobs, offsets[index] = completion_logprobs(tokenizer, ids, entries, offsets[index])
            yield chunk([{"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": event.finish_reason}])
    prompt_tokens = sum(len(p) for p in call.prompts)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    state.metrics.generation_tokens.inc(sum(tokens))
    if call.include_usage:
        yield sse({"id": response_id, "object": obj, "created": created, "model": state.model_name,
                   "system_fingerprint": None, "choices": [], "usage": usage(prompt_tokens, sum(tokens))})
    yield sse("[DONE]")


# ---- chat about images ------------------------------------------------------------------------------------------


async def image_chat(state: ServeState, images: ImageChat, body: dict[str, Any]) -> Response:
    """A chat completion of an image-to-text model: checked and decoded, then generated, in the worker thread."""
    check_fields(body, CHAT_FIELDS)
    check_model(body, state.model_name)
    call = await state.run_blocking(images.prepare, body)
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if call.stream:
        return StreamingResponse(image_chat_stream(state, call, response_id, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    completion = await state.run_blocking(images.complete, call)
    state.metrics.prompt_tokens.inc(completion.prompt_tokens)
    state.metrics.generation_tokens.inc(len(completion.token_ids))
    return JSONResponse(chat_completion(response_id, created, state.model_name, completion))


async def image_chat_stream(state: ServeState, call: ImageChatCall, response_id: str,
                            created: int) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending in `data: [DONE]`, as the worker thread generates; a
    client that leaves stops the generation (the worker looks before each token)."""
    events: asyncio.Queue[tuple[str, Any] | Exception] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    cancelled = threading.Event()

    def worker_ended(task: asyncio.Task) -> None:  # a worker that never ran (shutdown) must not leave us waiting
        if task.cancelled():
            events.put_nowait(APIError(503, "the server is shutting down", error_type="service_unavailable"))
        elif task.exception() is not None:
            events.put_nowait(task.exception())

    worker = asyncio.ensure_future(state.run_blocking(
        ImageChat.stream, call, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), cancelled))
    worker.add_done_callback(worker_ended)
    name = state.model_name
    try:
        yield sse(chat_chunk(response_id, created, name, call, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Exception):
                error = event if isinstance(event, APIError) else APIError(
                    500, f"generation failed: {type(event).__name__}: {event}", error_type="server_error")
                yield sse(error.body())
                break
            delta, completion = event
            if delta:
                yield sse(chat_chunk(response_id, created, name, call, {"content": delta}))
            if completion is not None:
                state.metrics.prompt_tokens.inc(completion.prompt_tokens)
                state.metrics.generation_tokens.inc(len(completion.token_ids))
                yield sse(chat_chunk(response_id, created, name, call, {}, completion.finish_reason))
                if call.include_usage:
                    yield sse(usage_chunk(response_id, created, name, completion))
                break
        yield sse("[DONE]")
    finally:
        cancelled.set()
