"""The OpenAI protocol: request bodies checked and turned into prompts and SamplingParams, errors in OpenAI's shape.

Every bad input becomes an `APIError` (`{"error": {message, type, param, code}}` with a 4xx status), raised before
the engine sees the request; the HTTP layer (`api.py`) only reads bodies and writes responses.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import decoders

from sparkgpt.errors import SparkGPTError
from sparkgpt.generate import SamplingParamError, SamplingParams, is_int, is_number
from sparkgpt.lm import LM
from sparkgpt.serve.constraints import (
    Grammar,
    GrammarError,
    choice_grammar,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)
from sparkgpt.serve.embeddings import Pooler
from sparkgpt.serve.engine import MAX_TOP_LOGPROBS, ChoiceEvent, ContextLengthExceeded, Engine, TokenLogprob
from sparkgpt.tokenizer import Tokenizer

MAX_CHOICES = 128           # n at most (as OpenAI)
MAX_STOP_STRINGS = 4        # as OpenAI
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
# Fields each route accepts beyond its own. top_k and repetition_penalty are sparkgpt extensions (extra_body).
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                 "user", "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p",
                 "repetition_penalty"}
# Structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields (one at most).
STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice")
TOOL_FIELDS = {"tools", "tool_choice", "parallel_tool_calls"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", *STRUCTURED_FIELDS,
                               *TOOL_FIELDS}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", *STRUCTURED_FIELDS}
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' `logprobs` at most (as OpenAI)
LOGPROB_FLOOR = -9999.0      # reported for a token the model rules out (-inf is not JSON), as OpenAI and vLLM do
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
MAX_EMBEDDING_INPUTS = 2048       # inputs per request at most (as OpenAI)
MAX_EMBEDDING_TOKENS = 300_000    # tokens per request at most, all inputs together (as OpenAI)
# The OpenAI name of each SamplingParams field, for the error's `param`.
PARAM_NAMES = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- requests -----------------------------------------------------------------------------------------------------


MAX_JSON_DEPTH = 64        # arrays and objects nested deeper than this are refused (no field needs more than 4)
MAX_INTEGER_DIGITS = 40    # no field needs more (a seed has 20); 401 digits would overflow float checks later


class _HostileJSON(ValueError):
    """Valid JSON that no request needs and that would trouble the checks after it: refused with a 400."""


def _parse_int(text: str) -> int | float:
    """An integer, or for one of more than MAX_INTEGER_DIGITS digits ±infinity, which every field's check refuses
    by name (as it does NaN, Infinity and 1e999, which json reads as floats): never a float overflow, never
    int()'s quadratic parse of thousands of digits."""
    if len(text) - text.startswith("-") > MAX_INTEGER_DIGITS:
        return -math.inf if text.startswith("-") else math.inf
    return int(text)


def _check_json_value(body: Any) -> None:
    """Every string is text (no lone UTF-16 surrogate such as "\\ud800": it cannot be encoded, tokenized or
    echoed), and the nesting is at most MAX_JSON_DEPTH; iterative, so no depth can exhaust the stack."""
    stack: list[tuple[Any, int]] = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _HostileJSON("it holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text.")
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise _HostileJSON(f"it nests arrays or objects more than {MAX_JSON_DEPTH} deep.")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request's JSON body, which must be an object. Valid but hostile JSON is a 400 too: lone surrogates and
    absurd nesting here; NaN, infinities and huge numbers (`_parse_int`) by the checks of the field holding them."""
    try:
        body = json.loads(raw, parse_int=_parse_int)
        _check_json_value(body)
    except _HostileJSON as error:
        raise invalid(None, f"We could not accept the JSON body of your request: {error}") from None
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
        raise invalid(None, "We could not parse the JSON body of your request: it is not valid JSON.") from None
    if not isinstance(body, dict):
        raise invalid(None, f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise invalid(name, f"Unrecognized request argument supplied: {name}")
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


def parse_messages(messages: Any, reads_images: bool = False) -> list[dict[str, Any]]:
    """OpenAI's messages, checked. Content parts become one string for a text model; for a model that reads
    images (`reads_images`) they stay as sent, for `LM.chat_inputs` to decode their images."""
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
        parts = isinstance(content, list)
        if parts:
            content = _content_parts(content, f"messages[{i}].content", reads_images)
        calls = message.get("tool_calls") if role == "assistant" else None
        if content is None and calls:  # an assistant turn that only called tools
            content = ""
        if not (parts or isinstance(content, str)):
            raise invalid(f"messages[{i}].content", f"messages[{i}].content must be a string.")
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if calls is not None:
            entry["tool_calls"] = _parse_tool_calls(calls, f"messages[{i}].tool_calls")
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise invalid(f"messages[{i}].tool_call_id", f"messages[{i}] (a tool result) needs 'tool_call_id': "
                              "the id of the call it answers.")
            entry["tool_call_id"] = message["tool_call_id"]
        parsed.append(entry)
    return parsed


def _content_parts(parts: list[Any], param: str, reads_images: bool) -> str | list[Any]:
    """A message's content parts: their text joined, or for a model that reads images the parts themselves
    (text and image_url). An image part for a text model is refused by name, as any other kind of part."""
    texts = []
    for j, part in enumerate(parts):
        field = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url" and not reads_images:
            raise invalid(field, f"{field}: this model does not read images (it has no image encoder); send text "
                          "content parts only.", code="image_input_unsupported")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind != "image_url":
            accepted = " or {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:...\"}}" if reads_images else ""
            raise invalid(field, f"only text content parts are supported: {{\"type\": \"text\", \"text\": "
                          f"\"...\"}}{accepted}")
    return list(parts) if reads_images else "".join(texts)


def _parse_tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """An assistant turn's earlier tool calls, their arguments parsed from OpenAI's JSON strings."""
    if not isinstance(calls, list):
        raise invalid(param, f"'{param}' must be an array of tool calls.")
    parsed = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)):
            raise invalid(f"{param}[{j}]", f"{param}[{j}] must be {{\"id\", \"type\": \"function\", \"function\": "
                          "{\"name\": str, \"arguments\": JSON string}}.")
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError:
            raise invalid(f"{param}[{j}].function.arguments", f"{param}[{j}].function.arguments is not valid "
                          "JSON.") from None
        parsed.append({"id": call.get("id") if isinstance(call.get("id"), str) else "", "type": "function",
                       "function": {"name": function["name"], "arguments": arguments}})
    return parsed


def parse_prompts(engine: Engine, prompt: Any) -> list[list[int]]:
    """A completion prompt as token ids: a string, token ids, or a list of either (one choice set per prompt)."""
    if prompt is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
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
        elif isinstance(item, list) and item and all(is_int(t) and 0 <= t < vocab for t in item):
            prompts.append(list(item))
        else:
            raise invalid("prompt", f"'prompt' items must be strings or non-empty arrays of token ids in [0, {vocab}).")
    return prompts


@dataclass
class EmbeddingCall:
    """An embeddings request ready for a `Pooler`: each input as token ids, and how to write the vectors."""

    inputs: list[list[int]]
    encoding_format: str  # "float" or "base64"

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)


def check_embedding_options(body: dict[str, Any], pooler: Pooler) -> str:
    """The encoding format, once `encoding_format` and `dimensions` are checked (cheap: no tokenizing)."""
    encoding_format = _optional(body, "encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise invalid("encoding_format", f"Invalid value for 'encoding_format': {encoding_format!r}; expected "
                      "'float' or 'base64'.")
    dimensions = body.get("dimensions")
    if dimensions is not None and not (is_int(dimensions) and dimensions == pooler.dim):
        raise invalid("dimensions", f"This model's embeddings have {pooler.dim} dimensions and cannot be shortened: "
                      f"'dimensions' must be {pooler.dim} or left out, not {dimensions!r}.")
    if body.get("input") is None:
        raise invalid("input", "Missing required parameter: 'input'.")
    return encoding_format


def parse_embedding_inputs(pooler: Pooler, value: Any, encoding_format: str) -> EmbeddingCall:
    """OpenAI's `input`: a string, an array of strings, an array of token ids, or an array of such arrays; each
    non-empty, in the vocabulary and within the model's context. Tokenizes, so it runs off the event loop."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(is_int(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid("input", "'input' must be a non-empty string, an array of strings, an array of token ids, or "
                      "an array of arrays of token ids.")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise invalid("input", f"'input' holds {len(value)} items; at most {MAX_EMBEDDING_INPUTS} are allowed per "
                      "request.")
    inputs, total = [], 0
    for i, item in enumerate(value):
        where = "input" if len(value) == 1 else f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise invalid("input", f"'{where}' is an empty string; every input must hold some text.")
            try:
                ids = pooler.encode(item)
            except SparkGPTError as error:
                raise invalid("input", str(error)) from None
        elif isinstance(item, list) and item and all(is_int(t) for t in item):
            outside = next((t for t in item if not 0 <= t < pooler.vocab_size), None)
            if outside is not None:
                raise invalid("input", f"'{where}' holds the token id {outside}, outside this model's vocabulary "
                              f"[0, {pooler.vocab_size}).")
            ids = list(item)
        else:
            raise invalid("input", f"'{where}' must be a non-empty string or a non-empty array of token ids.")
        if len(ids) > pooler.context:
            raise invalid("input", f"This model's maximum context length is {pooler.context} tokens, however '{where}' "
                          f"is {len(ids)} tokens long. Please shorten it.", code="context_length_exceeded")
        total += len(ids)
        if total > MAX_EMBEDDING_TOKENS:
            raise invalid("input", f"The inputs hold more than {MAX_EMBEDDING_TOKENS} tokens together, the most one "
                          "request may embed. Send them in several requests.")
        inputs.append(ids)
    return EmbeddingCall(inputs, encoding_format)


@dataclass
class Call:
    """One API call ready for the engine: its prompts (each gets n choices) and sampling parameters, and the
    log-probabilities asked for (alternatives per token; None: none)."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    score_only: bool = False               # max_tokens 0 with echo: the prompt is scored, nothing generated
    echo_texts: list[str] | None = None    # /v1/completions' echo: each prompt's text, put before its choices'
    grammar: Grammar | None = None         # what every choice's text must match (structured output, tool calls)
    tools: Sequence[dict[str, Any]] = ()   # the tools whose calls a chat reply may carry (`tool_calls.py` reads them)


def prepare_call(
    engine: Engine, body: dict[str, Any], prompts: list[list[int]], prompt_param: str, max_tokens: Any,
    max_tokens_param: str, default_max_tokens: int | None,
) -> Call:
    """Validate the sampling fields (OpenAI's ranges, then SamplingParams' own checks), the log-probability fields
    (chat's when prompt_param is "messages", else the legacy completions'), and the context length."""
    chat = prompt_param == "messages"
    logprobs, echo = parse_chat_logprobs(body) if chat else parse_completion_logprobs(body)
    score_only = echo and max_tokens == 0 and is_int(max_tokens)
    if score_only:  # SamplingParams wants a token to sample; the engine samples none for a score-only call
        max_tokens = 1
    n = _optional(body, "n", 1)
    if not is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise invalid("n", f"Invalid value for 'n': {n!r}; expected an integer from 1 to {MAX_CHOICES}.")
    stream, include_usage = parse_stream(body)
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        max_tokens = default_max_tokens or max(1, engine.context - longest)
    params = sampling_params(body, max_tokens, max_tokens_param, engine.lm.config.vocab_size)
    try:
        engine.check_fits(longest, 0 if score_only else params.max_new_tokens)
    except ContextLengthExceeded as error:
        raise invalid(prompt_param, str(error), code="context_length_exceeded") from None
    echo_texts = _prompt_texts(engine.lm.tokenizer, body.get("prompt"), prompts) if echo else None
    grammar = structured_grammar(engine, body)
    tools, _ = parse_tools(body)
    return Call(prompts, params, n, stream, include_usage, logprobs, logprobs if echo else None, score_only,
                echo_texts, grammar, () if body.get("tool_choice") == "none" else tools)


def parse_stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """`stream`, and whether the stream ends with a usage chunk (`stream_options.include_usage`)."""
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
    return stream, include_usage


def sampling_params(body: dict[str, Any], max_tokens: Any, max_tokens_param: str, vocab_size: int) -> SamplingParams:
    """The sampling fields against OpenAI's ranges, then SamplingParams' own checks; each error names its field."""
    temperature = _optional(body, "temperature", 1.0)
    if not (is_number(temperature) and 0 <= temperature <= 2):
        raise invalid("temperature", f"Invalid value for 'temperature': {temperature!r}; expected a number from 0 "
                      "to 2.")
    stop = _optional(body, "stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop", f"'stop' must be a non-empty string or an array of at most {MAX_STOP_STRINGS} "
                      "non-empty strings.")
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or not -(2**63) <= seed < 2**63 - MAX_CHOICES):
        raise invalid("seed", "'seed' must be a 64-bit integer.")
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature, top_p=_optional(body, "top_p", 1.0),
            top_k=body.get("top_k"), repetition_penalty=_optional(body, "repetition_penalty", 1.0),
            presence_penalty=_optional(body, "presence_penalty", 0.0),
            frequency_penalty=_optional(body, "frequency_penalty", 0.0),
            logit_bias=parse_logit_bias(body.get("logit_bias"), vocab_size),
            min_p=_optional(body, "min_p", 0.0), stop=tuple(stop), seed=seed,
        )
    except SamplingParamError as error:
        param = max_tokens_param if error.field == "max_new_tokens" else PARAM_NAMES.get(error.field, error.field)
        raise invalid(param, f"Invalid value for '{param}': {error}") from None


def parse_chat_logprobs(body: dict[str, Any]) -> tuple[int | None, bool]:
    """Chat's `logprobs` (a boolean) and `top_logprobs` (0..20, only with logprobs): (alternatives or None, False)."""
    asked = _optional(body, "logprobs", False)
    if not isinstance(asked, bool):
        raise invalid("logprobs", f"Invalid value for 'logprobs': {asked!r}; expected a boolean.")
    top = body.get("top_logprobs")
    if top is not None:
        if not (is_int(top) and 0 <= top <= MAX_TOP_LOGPROBS):
            raise invalid("top_logprobs", f"Invalid value for 'top_logprobs': {top!r}; expected an integer from 0 "
                          f"to {MAX_TOP_LOGPROBS}.")
        if not asked:
            raise invalid("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
    return (top or 0) if asked else None, False


def parse_completion_logprobs(body: dict[str, Any]) -> tuple[int | None, bool]:
    """The legacy `logprobs` (alternatives per token, 0..5) and `echo` (a boolean): (alternatives or None, echo)."""
    top = body.get("logprobs")
    if top is not None and not (is_int(top) and 0 <= top <= MAX_COMPLETION_LOGPROBS):
        raise invalid("logprobs", f"Invalid value for 'logprobs': {top!r}; expected an integer from 0 to "
                      f"{MAX_COMPLETION_LOGPROBS}.")
    echo = _optional(body, "echo", False)
    if not isinstance(echo, bool):
        raise invalid("echo", f"Invalid value for 'echo': {echo!r}; expected a boolean.")
    return top, echo


def _prompt_texts(tokenizer: Tokenizer, given: Any, prompts: list[list[int]]) -> list[str]:
    """Each prompt as `echo` writes it: a string as sent, token ids decoded (special tokens kept)."""
    items = given if isinstance(given, list) and not all(is_int(t) for t in given) else [given]
    return [item if isinstance(item, str) else tokenizer.decode(ids, skip_special_tokens=False)
            for item, ids in zip(items, prompts, strict=True)]


def parse_logit_bias(value: Any, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `logit_bias`: an object mapping token ids (as strings) to a bias from -100 to 100, each id in the
    vocabulary."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("logit_bias", "'logit_bias' must be an object mapping token ids to numbers from -100 to 100.")
    bias = {}
    for key, number in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12 else -1
        if not 0 <= token < vocab_size:
            raise invalid("logit_bias", f"Invalid key in 'logit_bias': {key[:40]!r} is not a token id of this model "
                          f"(an integer from 0 to {vocab_size - 1}).")
        if not (is_number(number) and -100 <= number <= 100):
            raise invalid("logit_bias", f"Invalid value in 'logit_bias' for token {token}: {number!r}; expected a "
                          "number from -100 to 100.")
        bias[token] = float(number)
    return bias


def structured_grammar(engine: Engine, body: dict[str, Any]) -> Grammar | None:
    """The compiled grammar a request's structured-output field or forced tool call asks for (None: free text).
    Compiling runs the grammar engine: call it off the event loop. Anything the grammar engine cannot enforce is a
    400 naming the field, never free text."""
    asked = [name for name in STRUCTURED_FIELDS if body.get(name) is not None]
    if len(asked) > 1:
        raise invalid(asked[1], f"Ask for one kind of structured output: {' and '.join(map(repr, asked))} were both "
                      "given.")
    tools, forced = parse_tools(body)
    source = _structured_source(body, asked[0]) if asked else None
    if source is not None and forced is not None:
        raise invalid(asked[0], f"'{asked[0]}' cannot be combined with a tool_choice that forces a tool call.")
    if forced is not None:
        source = tool_call_source(tools, forced)
    if source is None:
        return None
    build, param, what = source
    try:
        return engine.grammars.compile(build())
    except GrammarError as error:
        raise invalid(param, f"Invalid {what}: {error}", code="invalid_grammar") from None


GrammarSource = tuple[Callable[[], str], str, str]  # (builds the grammar text, the field named on error, what it is)


def _structured_source(body: dict[str, Any], field: str) -> GrammarSource | None:
    """The grammar one structured-output field asks for; None for `response_format: {"type": "text"}`."""
    value = body[field]
    if field == "response_format":
        return _response_format_source(value)
    if field == "guided_json":
        return _schema_source(value, field)
    if field == "guided_regex":
        return _regex_source(value, field)
    if field == "guided_choice":
        return _choice_source(value, field)
    kinds = {"json", "regex", "choice", "grammar", "json_object"}
    if not isinstance(value, dict) or len(value) != 1 or not set(value) <= kinds:
        raise invalid(field, "'structured_outputs' must be an object with exactly one of 'json' (a JSON schema), "
                      "'regex', 'choice' (an array of strings), 'grammar' (Lark or GBNF) or 'json_object' (true).")
    (kind, spec), = value.items()
    param = f"{field}.{kind}"
    if kind == "json":
        return _schema_source(spec, param)
    if kind == "regex":
        return _regex_source(spec, param)
    if kind == "choice":
        return _choice_source(spec, param)
    if kind == "grammar":
        if not isinstance(spec, str) or not spec.strip():
            raise invalid(param, f"'{param}' must be a grammar in Lark or GBNF syntax, as a non-empty string.")
        return functools.partial(lark_grammar, spec), param, f"grammar in '{param}'"
    if spec is not True:
        raise invalid(param, f"'{param}' must be true.")
    return json_object_grammar, param, "JSON object constraint"


def _response_format_source(value: Any) -> GrammarSource | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict", "description"}}."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("response_format", "'response_format' must be an object with a 'type': 'text', 'json_object' "
                      "or 'json_schema'.")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar, "response_format", "JSON object constraint"
    if kind != "json_schema":
        raise invalid("response_format.type", f"Invalid value for 'response_format.type': {kind!r}; expected "
                      "'text', 'json_object' or 'json_schema'.")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise invalid("response_format.json_schema", "'response_format.json_schema' must be an object holding the "
                      "'schema' (and a 'name').")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid("response_format.json_schema.name", "'response_format.json_schema.name' must be a string.")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise invalid("response_format.json_schema.strict", "'response_format.json_schema.strict' must be a boolean.")
    build, param, _ = _schema_source(spec["schema"], "response_format.json_schema.schema")
    return build, param, f"schema for response_format {name!r}" if name else "schema for response_format"


def _schema_source(schema: Any, param: str) -> GrammarSource:
    """A JSON schema, given as an object (or a boolean), or as a string holding one (vLLM accepts both)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise invalid(param, f"'{param}' is a string but not JSON: give the schema as an object.") from None
    if not isinstance(schema, (dict, bool)):
        raise invalid(param, f"'{param}' must be a JSON schema (an object).")
    return functools.partial(json_schema_grammar, schema), param, f"schema in '{param}'"


def _regex_source(pattern: Any, param: str) -> GrammarSource:
    if not isinstance(pattern, str) or not pattern:
        raise invalid(param, f"'{param}' must be a non-empty regular expression.")
    return functools.partial(regex_grammar, pattern), param, f"regex in '{param}'"


def _choice_source(choices: Any, param: str) -> GrammarSource:
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
        raise invalid(param, f"'{param}' must be a non-empty array of non-empty strings.")
    return functools.partial(choice_grammar, choices), param, f"choice in '{param}'"


# ---- tools --------------------------------------------------------------------------------------------------------


def parse_tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Chat's `tools` (OpenAI's [{"type": "function", "function": {name, description, parameters}}]) and which
    call `tool_choice` forces: None ("none", or "auto": the reply is free, and under "auto" the calls it makes are
    read out of it afterwards), "" ("required": a call of any of them), or a function's name."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    elif not isinstance(tools, list):
        raise invalid("tools", "'tools' must be an array of {\"type\": \"function\", \"function\": {...}} objects.")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise invalid(f"tools[{i}]", f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                          "{\"name\": ..., \"parameters\": {...}}} with a non-empty name.")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters must be a JSON schema "
                          "(an object).")
        names.append(function["name"])
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise invalid("parallel_tool_calls", "'parallel_tool_calls' must be a boolean.")
    choice = body.get("tool_choice")
    if choice is None:
        return tools, None
    if not tools:
        raise invalid("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
    if choice in ("none", "auto"):
        return tools, None
    if choice == "required":
        return tools, ""
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)):
        raise invalid("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                      "\"function\": {\"name\": ...}}.")
    if name not in names:
        raise invalid("tool_choice", f"tool_choice names the function {name!r}, which is not among 'tools'.")
    return tools, name


def tool_call_source(tools: list[dict[str, Any]], forced: str) -> GrammarSource:
    """The grammar of a call {"name": ..., "arguments": {...}} of the function `forced` ("": any of the tools),
    its arguments matching the function's parameters. Each tool's `$defs` (and `definitions`) move to the root,
    where its `#/$defs/...` references look for them."""
    functions = [tool["function"] for tool in tools if forced in ("", tool["function"]["name"])]
    calls, definitions = [], {}
    for function in functions:
        parameters = dict(function.get("parameters") or {"type": "object"})
        for key in ("$defs", "definitions"):
            for name, definition in (parameters.pop(key, None) or {}).items():
                if definitions.setdefault(key, {}).setdefault(name, definition) != definition:
                    raise invalid("tools", f"Two tools define {key}/{name} differently; give them distinct names.")
        calls.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                      "required": ["name", "arguments"], "additionalProperties": False})
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), **definitions}
    return functools.partial(json_schema_grammar, schema), "tools", "tool parameters schema"


def tool_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the tools described in its system message, for a chat template that knows no tools."""
    described = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    text = ("You can call these functions (JSON schemas of their parameters):\n" + described + "\nTo call one, reply "
            "with a JSON object only: {\"name\": <function name>, \"arguments\": <its arguments>}.")
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def templates_tools(lm: LM) -> bool:
    """The model's chat template renders tools, tool calls and tool results itself."""
    return "tools" in (lm.tokenizer.chat_template or "")


def plain_tool_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier tool calls and results as plain turns, for a chat template that knows no tools: a call reads as the
    JSON object the model is asked to reply with, a result as a user turn naming its call."""
    names = {call["id"]: call["function"]["name"] for m in messages for call in m.get("tool_calls", ())}
    plain = []
    for message in messages:
        if message["role"] == "tool":
            name = names.get(message["tool_call_id"], "a function")
            plain.append({"role": "user", "content": f"Result of {name}: {message['content']}"})
        elif message.get("tool_calls"):
            calls = "\n".join(json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
                                         ensure_ascii=False) for call in message["tool_calls"])
            plain.append({"role": "assistant", "content": "\n".join(filter(None, [message["content"], calls]))})
        else:
            plain.append(message)
    return plain


def chat_prompt_ids(lm: LM, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[int]:
    """A conversation's prompt, with the tools offered and the earlier calls and results: through the chat
    template's own `tools` where it has them, else described in the system message and written as plain turns."""
    tokenizer = lm.tokenizer
    if templates_tools(lm):
        if not tools:
            return lm.chat_prompt(messages)
        return tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools), add_special_tokens=False)
    messages = plain_tool_history(messages)
    return lm.chat_prompt(tool_messages(messages, tools) if tools else messages)


def tool_call_entry(call: dict[str, Any]) -> dict[str, Any]:
    """A call {"name", "arguments"} as OpenAI's tool_calls entry, its arguments a JSON string."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def _optional(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


# ---- responses ----------------------------------------------------------------------------------------------------


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the others for 256 + i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(byte): byte for byte in printable}
    extra = (byte for byte in range(256) if byte not in table.values())
    table.update((chr(256 + i), byte) for i, byte in enumerate(extra))
    return table


_BYTE_OF_CHAR = _byte_level_table()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's piece for a raw byte


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """A token's own bytes, which may be part of a UTF-8 character (decoding it alone would give U+FFFD)."""
    piece = tokenizer.backend.id_to_token(token) or ""
    if match := _BYTE_FALLBACK.fullmatch(piece):
        return bytes([int(match[1], 16)])
    if isinstance(tokenizer.backend.decoder, decoders.ByteLevel) and all(c in _BYTE_OF_CHAR for c in piece):
        return bytes(_BYTE_OF_CHAR[c] for c in piece)
    return tokenizer.decode([token], skip_special_tokens=False).encode()


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as text; a piece of a UTF-8 character as escapes of its bytes ("\\xe4"), as OpenAI writes it."""
    return token_bytes(tokenizer, token).decode("utf-8", errors="backslashreplace")


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def described(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token), "logprob": _logprob(logprob),
                "bytes": list(token_bytes(tokenizer, token))}

    return {"content": [{**described(entry.token, entry.logprob),
                         "top_logprobs": [described(token, logprob) for token, logprob in entry.top]}
                        for entry in entries], "refusal": None}


def completion_logprobs(tokenizer: Tokenizer, tokens: Sequence[int], entries: Sequence[TokenLogprob | None],
                        offset: int = 0) -> tuple[dict[str, Any], int]:
    """The legacy `logprobs` of these tokens ({tokens, token_logprobs, top_logprobs: [{token: logprob}],
    text_offset}; an entry None, the first prompt token's, is null) and the text offset after them. Each
    top_logprobs holds the token itself beside its alternatives, as vLLM's do."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries, strict=True):
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {token_text(tokenizer, other): _logprob(logprob) for other, logprob in entry.top}
        top.setdefault(text, _logprob(entry.logprob))
        out["token_logprobs"].append(_logprob(entry.logprob))
        out["top_logprobs"].append(top)
    return out, offset


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def engine_failure(event: ChoiceEvent) -> APIError:
    """A choice the engine failed, as an error of the whole call. Logits that turned NaN or infinite come from the
    request's own sampling parameters (a huge logit_bias or penalty), so that request alone ends with a 400
    ("numerical_error"); a shutdown that outlasted its drain is a 503; anything else is the engine's fault: 500
    "engine_error"."""
    if event.code == "numerical_error":
        return APIError(400, event.error or "the logits stopped being finite", code="numerical_error")
    if event.code == "server_shutting_down":  # the drain's timeout ran out: retry elsewhere
        return APIError(503, event.error or "the server is shutting down", error_type="service_unavailable",
                        code="server_shutting_down")
    return APIError(500, event.error or "the engine failed", error_type="server_error",
                    code=event.code or "engine_error")


def embedding_response(call: EmbeddingCall, vectors: np.ndarray, model_name: str) -> dict[str, Any]:
    """OpenAI's list of embeddings: floats, or base64 of the float32 little-endian bytes."""
    def encoded(vector: np.ndarray) -> list[float] | str:
        if call.encoding_format == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        return vector.tolist()

    data = [{"object": "embedding", "index": i, "embedding": encoded(vector)} for i, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": call.tokens, "total_tokens": call.tokens}}
