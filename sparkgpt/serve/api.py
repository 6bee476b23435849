"""The HTTP API: OpenAI-compatible routes, errors in OpenAI's shape, Prometheus metrics and the chat page.

This layer only translates: a JSON body becomes a prompt and SamplingParams for `Engine.submit`, engine events
become a response or server-sent events, and every bad input becomes `{"error": {message, type, param, code}}`
with a 4xx status, checked before the first byte of a stream is sent.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparkgpt.errors import SparkGPTError
from sparkgpt.generate import SamplingParamError, SamplingParams
from sparkgpt.serve.engine import ChoiceEvent, ContextLengthExceeded, Engine, EngineRequest, QueueFull

STATIC_DIR = Path(__file__).parent / "static"
MAX_CHOICES = 128           # n at most (as OpenAI)
MAX_STOP_STRINGS = 4        # as OpenAI
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
CHAT_ROLES = {"system", "developer", "user", "assistant"}
# Fields each route accepts beyond its own. top_k and repetition_penalty are sparkgpt extensions (extra_body).
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                 "user", "presence_penalty", "frequency_penalty", "top_k", "repetition_penalty"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
# The OpenAI name of each SamplingParams field, for the error's `param`.
PARAM_NAMES = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- state and metrics ------------------------------------------------------------------------------------------


class Metrics:
    """The Prometheus series the server exports at /metrics (a registry of its own, one per app)."""

    def __init__(self, state: ServeState) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sparkgpt_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram(
            "sparkgpt_request_latency_seconds", "Time from request to the last byte of the response, by route",
            ["route"], registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160))
        self.time_to_first_token = Histogram(
            "sparkgpt_time_to_first_token_seconds", "Time from request to the first generated text",
            registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40))
        self.prompt_tokens = Counter("sparkgpt_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("sparkgpt_generation_tokens", "Tokens generated for finished requests",
                                         registry=r)
        self.aborted = Counter("sparkgpt_requests_aborted", "Requests aborted because the client went away",
                               registry=r)
        self.rejected = Counter("sparkgpt_requests_rejected", "Requests refused because the queue was full",
                                registry=r)
        queue_depth = Gauge("sparkgpt_queue_depth", "Requests waiting for a slot", registry=r)
        queue_depth.set_function(lambda: state.engine.queue_depth if state.engine else 0)
        active = Gauge("sparkgpt_active_sequences", "Sequences holding a KV-cache slot", registry=r)
        active.set_function(lambda: state.engine.active_sequences if state.engine else 0)
        slots = Gauge("sparkgpt_slots", "KV-cache slots (sequences decoded together at most)", registry=r)
        slots.set_function(lambda: state.engine.max_slots if state.engine else 0)
        reused = Gauge("sparkgpt_prompt_tokens_reused", "Prompt tokens whose keys/values were copied from a "
                       "cached prefix instead of computed", registry=r)
        reused.set_function(lambda: state.engine.reused_prompt_tokens if state.engine else 0)
        steps = Gauge("sparkgpt_decode_steps", "Batched decode steps run since start", registry=r)
        steps.set_function(lambda: state.engine.steps if state.engine else 0)


@dataclass
class ServeState:
    model_name: str
    api_key: str | None
    engine: Engine | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self)

    def ready_engine(self) -> Engine:
        if self.engine is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, message, error_type="service_unavailable", code="model_loading")
        return self.engine


ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


class MetricsMiddleware:
    """Counts every request by route and status and times it to its last byte (pure ASGI: streams pass as is)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "/static" if path.startswith("/static/") else "other"
        status = 500
        start = time.perf_counter()

        async def send_with_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


# ---- the app ---------------------------------------------------------------------------------------------------


def create_app(
    model_name: str, load_engine: Callable[[], Engine], api_key: str | None = None,
    on_load_error: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app. The model loads in a background thread (`load_engine`), so /health answers 503 at once
    and 200 when the engine runs; `on_load_error` hears a failed load (the CLI then shuts the server down)."""
    state = ServeState(model_name, api_key or None)

    def load() -> None:
        try:
            state.engine = load_engine()
        except Exception as error:
            state.load_error = str(error) if isinstance(error, SparkGPTError) else f"{type(error).__name__}: {error}"
            if on_load_error is not None:
                on_load_error(state.load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="sparkgpt-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="sparkgpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return APIError(error.status_code, str(error.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(error).__name__}", error_type="server_error").response()

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
        if state.engine is not None:
            return JSONResponse({"status": "ok", "model": state.model_name})
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
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
        engine = state.ready_engine()
        body = await read_body(request)
        check_fields(body, CHAT_FIELDS)
        check_model(body, state.model_name)
        messages = parse_messages(body.get("messages"))
        try:
            prompt_ids = engine.lm.chat_prompt(messages)
        except SparkGPTError as error:
            raise invalid("messages", str(error)) from None
        max_tokens = body.get("max_completion_tokens")
        max_tokens_param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, max_tokens_param = body.get("max_tokens"), "max_tokens"
        call = prepare_call(engine, body, [prompt_ids], "messages", max_tokens, max_tokens_param,
                            default_max_tokens=None)
        return await run_call(request, state, engine, call, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        engine = state.ready_engine()
        body = await read_body(request)
        check_fields(body, COMPLETION_FIELDS)
        check_model(body, state.model_name)
        prompts = parse_prompts(engine, body.get("prompt"))
        call = prepare_call(engine, body, prompts, "prompt", body.get("max_tokens"), "max_tokens",
                            default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS)
        return await run_call(request, state, engine, call, chat=False)

    return app


# ---- request parsing --------------------------------------------------------------------------------------------


async def read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
        raise invalid(None, "We could not parse the JSON body of your request: it is not valid JSON.") from None
    if not isinstance(body, dict):
        raise invalid(None, f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise invalid(name, f"Unrecognized request argument supplied: {name}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and not (_is_number(value) and value == 0):
            raise invalid(name, f"'{name}' is not supported by this server; leave it out or 0.")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise invalid("user", "'user' must be a string.")


def check_model(body: dict[str, Any], served: str) -> None:
    model = body.get("model")
    if model is None:
        raise invalid("model", "you must provide a model parameter")
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, not {type(model).__name__}.")
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist (this server serves '{served}').",
                       param="model", code="model_not_found")


def parse_messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise invalid("messages", "Missing required parameter: 'messages'.")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array of {role, content} objects.")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]", f"messages[{i}] must be an object with 'role' and 'content'.")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role", f"Invalid value for messages[{i}].role: {role!r}; expected one of "
                          f"{', '.join(sorted(CHAT_ROLES))}.")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text here
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise invalid(f"messages[{i}].content[{j}]", "only text content parts are supported: "
                                  "{\"type\": \"text\", \"text\": \"...\"}")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content", f"messages[{i}].content must be a string.")
        parsed.append({"role": "system" if role == "developer" else role, "content": content})
    return parsed


def parse_prompts(engine: Engine, prompt: Any) -> list[list[int]]:
    """A completion prompt as token ids: a string, token ids, or a list of either (one choice set per prompt)."""
    if prompt is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise invalid("prompt", "'prompt' must be a string, an array of strings, or an array of token ids.")
    vocab = engine.lm.config.vocab_size
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            try:
                prompts.append(engine.lm.encode(item))
            except SparkGPTError as error:
                raise invalid("prompt", str(error)) from None
        elif isinstance(item, list) and item and all(_is_int(t) and 0 <= t < vocab for t in item):
            prompts.append(list(item))
        else:
            raise invalid("prompt", f"'prompt' items must be strings or non-empty arrays of token ids in [0, {vocab}).")
    return prompts


@dataclass
class Call:
    """One API call ready for the engine: its prompts (each gets n choices) and sampling parameters."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool


def prepare_call(
    engine: Engine, body: dict[str, Any], prompts: list[list[int]], prompt_param: str, max_tokens: Any,
    max_tokens_param: str, default_max_tokens: int | None,
) -> Call:
    """Validate the sampling fields (OpenAI's ranges, then SamplingParams' own checks) and the context length."""
    n = _optional(body, "n", 1)
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise invalid("n", f"Invalid value for 'n': {n!r}; expected an integer from 1 to {MAX_CHOICES}.")
    stream = _optional(body, "stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", "'stream' must be a boolean.")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is true.")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options", "'stream_options' must be an object like {\"include_usage\": true}.")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise invalid("stream_options.include_usage", "'stream_options.include_usage' must be a boolean.")
    temperature = _optional(body, "temperature", 1.0)
    if not (_is_number(temperature) and 0 <= temperature <= 2):
        raise invalid("temperature", f"Invalid value for 'temperature': {temperature!r}; expected a number from 0 "
                      "to 2.")
    stop = _optional(body, "stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop", f"'stop' must be a non-empty string or an array of at most {MAX_STOP_STRINGS} "
                      "non-empty strings.")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**63 - MAX_CHOICES):
        raise invalid("seed", "'seed' must be a 64-bit integer.")
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        max_tokens = default_max_tokens or max(1, engine.context - longest)
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature, top_p=_optional(body, "top_p", 1.0),
            top_k=body.get("top_k"), repetition_penalty=_optional(body, "repetition_penalty", 1.0),
            stop=tuple(stop), seed=seed,
        )
    except SamplingParamError as error:
        param = max_tokens_param if error.field == "max_new_tokens" else PARAM_NAMES.get(error.field, error.field)
        raise invalid(param, f"Invalid value for '{param}': {error}") from None
    try:
        engine.check_fits(longest, params.max_new_tokens)
    except ContextLengthExceeded as error:
        raise invalid(prompt_param, str(error), code="context_length_exceeded") from None
    return Call(prompts, params, n, stream, include_usage)


def _optional(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
                self.requests.append(engine.submit(prompt, call.params, sink, call.n))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for request in self.requests:
            self.engine.abort(request)

    async def next_events(self) -> list[tuple[int, ChoiceEvent]]:
        """The next batch of (choice index across the call, event); counts finished choices down."""
        k, events = await self.events.get()
        out = []
        for event in events:
            if event.finish_reason is not None or event.error is not None:
                self.unfinished -= 1
            out.append((k * self.call.n + event.index, event))
        return out


async def run_call(request: Request, state: ServeState, engine: Engine, call: Call, chat: bool) -> Response:
    try:
        engine_call = EngineCall(engine, call)
    except QueueFull as error:
        state.metrics.rejected.inc()
        raise APIError(429, str(error), error_type="rate_limit_error", code="queue_full") from None
    except SparkGPTError as error:
        raise invalid(None, str(error)) from None
    kind = "chatcmpl" if chat else "cmpl"
    response_id = f"{kind}-{uuid.uuid4().hex}"
    started = time.perf_counter()
    if call.stream:
        stream = sse_stream(state, engine_call, response_id, chat, started)
        return EngineStreamResponse(stream, on_close=lambda: finish_stream(state, engine_call),
                                    media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(request, state, engine_call, response_id, chat, started)


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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def engine_failure(event: ChoiceEvent) -> APIError:
    return APIError(500, event.error or "the engine failed", error_type="server_error", code="engine_error")


async def collect(request: Request, state: ServeState, engine_call: EngineCall, response_id: str, chat: bool,
                  started: float) -> JSONResponse:
    """Wait for every choice; abort if the client disconnects while waiting."""
    call = engine_call.call
    count = len(call.prompts) * call.n
    texts, reasons, tokens = [""] * count, [None] * count, [0] * count
    first_token = True
    while engine_call.unfinished > 0:
        try:
            batch = await asyncio.wait_for(engine_call.next_events(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                state.metrics.aborted.inc()
                engine_call.abort()
                return JSONResponse({}, status_code=499)  # nobody is listening; the status is for the logs
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
    prompt_tokens = sum(len(p) for p in call.prompts)
    completion_tokens = sum(tokens)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    state.metrics.generation_tokens.inc(completion_tokens)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": reasons[i]} for i in range(count)]
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                   for i in range(count)]
    return JSONResponse({
        "id": response_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
        "model": state.model_name, "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    })


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_stream(state: ServeState, engine_call: EngineCall, response_id: str, chat: bool,
                     started: float) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending in `data: [DONE]`."""
    call = engine_call.call
    count = len(call.prompts) * call.n
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    usage_field = {"usage": None} if call.include_usage else {}

    def chunk(choices: list[dict[str, Any]]) -> str:
        return sse({"id": response_id, "object": obj, "created": created, "model": state.model_name,
                    "system_fingerprint": None, "choices": choices, **usage_field})

    if chat:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(count)])
    tokens = [0] * count
    first_token = True
    while engine_call.unfinished > 0:
        for index, event in await engine_call.next_events():
            if event.error is not None:
                engine_call.abort()
                failure = engine_failure(event)
                yield sse({"error": {"message": failure.message, "type": failure.error_type, "param": None,
                                     "code": failure.code}})
                yield sse("[DONE]")
                return
            tokens[index] = event.completion_tokens
            if first_token and event.text:
                state.metrics.time_to_first_token.observe(time.perf_counter() - started)
                first_token = False
            if chat:
                if event.text:
                    yield chunk([{"index": index, "delta": {"content": event.text}, "logprobs": None,
                                  "finish_reason": None}])
                if event.finish_reason is not None:
                    yield chunk([{"index": index, "delta": {}, "logprobs": None,
                                  "finish_reason": event.finish_reason}])
            else:
                yield chunk([{"index": index, "text": event.text, "logprobs": None,
                              "finish_reason": event.finish_reason}])
    prompt_tokens = sum(len(p) for p in call.prompts)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    state.metrics.generation_tokens.inc(sum(tokens))
    if call.include_usage:
        yield sse({"id": response_id, "object": obj, "created": created, "model": state.model_name,
                   "system_fingerprint": None, "choices": [], "usage": usage(prompt_tokens, sum(tokens))})
    yield sse("[DONE]")
