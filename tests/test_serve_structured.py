"""Structured output on `sparkgpt serve` (issue 23): response_format json_schema / json_object, vLLM's regex and
choice, forced tool calls; every grammar the engine cannot enforce is a 400, never free text.

A tiny random model serves: whatever it would say, the grammar's token masks force the reply into shape, so every
reply must parse and validate.
"""

from __future__ import annotations

import json
import queue
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sparkgpt import SamplingParams, Tokenizer
from sparkgpt.serve.constraints import json_schema_grammar
from sparkgpt.serve.engine import Engine
from sparkgpt.serve.protocol import chat_prompt_ids, parse_messages
from tests.test_serve import (  # noqa: F401 (one_torch_thread: a fixture)
    API_KEY,
    MODEL,
    USER,
    Server,
    collect_texts,
    one_torch_thread,
    tiny_lm,
)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

FUZZED_SCHEMAS = 30
MAX_TOKENS = 300  # a reply cut at max_tokens would not parse


@pytest.fixture(scope="module")
def server(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A long context: the tools' description makes a prompt of ~740 tokens in the tiny tokenizer's 320-token vocabulary.
    checkpoint = tiny_lm(tokenizer, max_seq_len=2048).save(tmp_path_factory.mktemp("serve") / "tiny-chat")
    log = tmp_path_factory.mktemp("logs") / "structured.log"
    server = Server(checkpoint, "--api-key", API_KEY, "--model-name", MODEL, "--max-concurrency", "4", log=log)
    yield server
    server.close()


def random_value_schema(rng: random.Random, depth: int) -> dict[str, Any]:
    """A property's schema: a bounded string, integer or number, a boolean, an enum, an array or a nested object."""
    kinds = ["string", "integer", "number", "boolean", "enum", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 12)}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": -10.5, "maximum": rng.choice([0, 3.25, 1e6])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        values = ["red", "green", "blue", 7, 2.5, None, True, "a \"quoted\" word"]
        return {"enum": rng.sample(values, rng.randint(1, 4))}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_value_schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 2)}
    return random_object_schema(rng, depth + 1)


def random_object_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object as OpenAI's strict mode wants it: every property required, no others allowed."""
    names = rng.sample(["name", "age", "score", "tags", "ok", "kind", "items", "when", "id"], rng.randint(1, 4))
    return {"type": "object", "properties": {name: random_value_schema(rng, depth) for name in names},
            "required": names, "additionalProperties": False}


def fuzzed_schemas() -> list[dict[str, Any]]:
    rng = random.Random(23)
    return [random_object_schema(rng) for _ in range(FUZZED_SCHEMAS)]


def post(server: Server, body: dict[str, Any], route: str = "chat/completions") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json={"model": MODEL, **body},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


# ---- response_format ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_json_schema_reply_parses_and_validates_over_fuzzed_strict_schemas(server: Server,
                                                                                  temperature: float):
    client = server.client()

    def ask(schema: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        reply = client.chat.completions.create(
            model=MODEL, messages=USER, temperature=temperature, max_tokens=MAX_TOKENS, seed=5,
            response_format={"type": "json_schema", "json_schema": {"name": "fuzzed", "schema": schema,
                                                                    "strict": True}})
        return schema, reply.choices[0]

    with ThreadPoolExecutor(4) as pool:  # four at a time: constrained rows share the engine's batched steps
        answers = list(pool.map(ask, fuzzed_schemas()))
    for schema, choice in answers:
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_gives_a_json_object(server: Server):
    # Greedy: any object may go on forever, and a random model sampling freely seldom closes one within max_tokens.
    reply = server.client().chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=MAX_TOKENS,
                                                    response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_json_schema_streams_a_valid_reply(server: Server):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "why": {"type": "string",
                                                                                         "maxLength": 20}},
              "required": ["answer", "why"], "additionalProperties": False}
    stream = server.client().chat.completions.create(
        model=MODEL, messages=USER, stream=True, max_tokens=MAX_TOKENS,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    jsonschema.validate(json.loads(text), schema)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_regex_choice_grammar_and_guided_json_constrain_chat_and_completions(server: Server):
    client = server.client()
    pattern = r"[a-z]{2,6}@example\.(com|org)"
    choices = ["yes", "no", "it depends"]
    for extra in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=50, temperature=1, seed=3,
                                               extra_body=extra)
        assert re.fullmatch(pattern, reply.choices[0].message.content), reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        completion = client.completions.create(model=MODEL, prompt="Mail:", max_tokens=50, extra_body=extra)
        assert re.fullmatch(pattern, completion.choices[0].text)
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        reply = client.chat.completions.create(model=MODEL, messages=USER, n=4, temperature=1, max_tokens=20,
                                               extra_body=extra)
        assert all(choice.message.content in choices and choice.finish_reason == "stop" for choice in reply.choices)
    lark = 'start: greeting " " name\ngreeting: "hi" | "hello"\nname: /[a-z]{1,8}/'
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=50, temperature=1,
                                           extra_body={"structured_outputs": {"grammar": lark}})
    assert re.fullmatch(r"(hi|hello) [a-z]{1,8}", reply.choices[0].message.content)
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=MAX_TOKENS,
                                           extra_body={"guided_json": {"type": "array", "items": {"type": "boolean"},
                                                                       "minItems": 1, "maxItems": 3}})
    assert all(isinstance(item, bool) for item in json.loads(reply.choices[0].message.content))


# ---- what cannot be enforced is a 400 -----------------------------------------------------------------------------


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema, "strict": True}}


@pytest.mark.parametrize(("body", "param", "named"), [
    ({"response_format": json_schema_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}})},
     "response_format.json_schema.schema", "/$defs/Missing"),
    ({"response_format": json_schema_format({"type": "array", "items": {"type": "string"}, "uniqueItems": True})},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": json_schema_format({"type": "object", "properties": {"a": {"type": "strng"}}})},
     "response_format.json_schema.schema", "strng"),
    ({"response_format": json_schema_format({"type": "string", "pattern": "(unclosed"})},
     "response_format.json_schema.schema", "unclosed group"),
    ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs.regex", "unclosed character class"),
    ({"guided_regex": "(ab"}, "guided_regex", "unclosed group"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "'yaml'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty array"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs.grammar", "missing_rule"),
    ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs", "exactly one of"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex", "one kind"),
])
def test_a_grammar_that_cannot_be_enforced_is_a_400_naming_the_problem(server: Server, body: dict[str, Any],
                                                                       param: str, named: str):
    response = post(server, {"messages": USER, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and named in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_the_official_client_sees_a_bad_schema_as_bad_request(server: Server):
    with pytest.raises(openai.BadRequestError, match="Missing"):
        server.client().chat.completions.create(
            model=MODEL, messages=USER,
            response_format=json_schema_format({"$ref": "#/definitions/Missing"}))


# ---- the engine: constrained rows beside free ones ----------------------------------------------------------------


def test_a_constrained_row_leaves_its_batch_neighbours_text_as_it_is_alone(tokenizer: Tokenizer,
                                                                          monkeypatch: pytest.MonkeyPatch):
    lm = tiny_lm(tokenizer, max_seq_len=256)
    free_prompt, constrained_prompt = lm.encode("To be, or not to be"), lm.encode("Hello there")
    params = SamplingParams(max_new_tokens=40, temperature=0)
    alone = lm.complete([free_prompt], max_new_tokens=40, temperature=0)[0].text
    engine = Engine(lm, max_slots=4, context=256)
    schema = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                         "minItems": 2, "maxItems": 4}},
              "required": ["words"], "additionalProperties": False}
    grammar = engine.grammars.compile(json_schema_grammar(schema))
    masked_rows: list[int] = []
    allowed_tokens = engine.grammars.allowed_tokens
    monkeypatch.setattr(engine.grammars, "allowed_tokens",
                        lambda matchers: masked_rows.append(len(matchers)) or allowed_tokens(matchers))
    sinks = [queue.SimpleQueue(), queue.SimpleQueue()]
    engine.submit(constrained_prompt, SamplingParams(max_new_tokens=100, temperature=0), sinks[0].put,
                  grammar=grammar)  # both before the engine runs: one prefill, shared decode steps
    engine.submit(free_prompt, params, sinks[1].put)
    engine.start()
    try:
        texts = collect_texts(sinks)
    finally:
        engine.stop()
    jsonschema.validate(json.loads(texts[0]), schema)
    assert texts[1] == alone
    assert masked_rows and set(masked_rows) == {1}  # only the constrained row's mask is ever computed


# ---- tools --------------------------------------------------------------------------------------------------------


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"$ref": "#/$defs/unit"},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit", "days"], "additionalProperties": False,
                   "$defs": {"unit": {"enum": ["celsius", "fahrenheit"]}}}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 24}},
                                     "required": ["query"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]


def arguments_schema(name: str) -> dict[str, Any]:
    return next(tool["function"]["parameters"] for tool in TOOLS if tool["function"]["name"] == name)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_tool_choice_gives_a_tool_call_whose_arguments_validate(server: Server, temperature: float):
    reply = server.client().chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                                    n=4, seed=2, temperature=temperature, max_tokens=MAX_TOKENS)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), arguments_schema(call.function.name))


def test_a_named_tool_choice_calls_that_function_streamed_or_not(server: Server):
    client = server.client()
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice,
                                           max_tokens=MAX_TOKENS)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), arguments_schema("get_weather"))
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice,
                                                 max_tokens=MAX_TOKENS, stream=True))
    deltas = [delta for chunk in chunks if chunk.choices for delta in chunk.choices[0].delta.tool_calls or []]
    assert [delta.function.name for delta in deltas] == ["get_weather"]
    jsonschema.validate(json.loads(deltas[0].function.arguments), arguments_schema("get_weather"))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_tool_choice_leaves_the_reply_free_text(server: Server):
    reply = server.client().chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=5)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.tool_calls is None


@pytest.mark.parametrize(("body", "param", "named"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/gone"}}}],
      "tool_choice": "required"}, "tools", "/$defs/gone"),
    ({"tools": [{"type": "function"}]}, "tools[0]", "non-empty name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "tool_choice"),
])
def test_bad_tools_are_a_400_naming_the_problem(server: Server, body: dict[str, Any], param: str, named: str):
    response = post(server, {"messages": USER, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and named in error["message"], error


def test_a_tool_round_trip_sends_the_call_and_its_result_back(server: Server, tokenizer):
    client = server.client()
    first = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=MAX_TOKENS)
    call = first.choices[0].message.tool_calls[0]
    history = [*USER, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=5)
    assert second.choices[0].finish_reason == "length" and second.choices[0].message.content

    # A template without tools reads the call as the JSON the model was asked for, the result as a user turn.
    messages = parse_messages(history)
    prompt = tokenizer.decode(chat_prompt_ids(tiny_lm(tokenizer), messages, TOOLS))
    arguments = json.loads(call.function.arguments)
    assert json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False) in prompt
    assert f"<|im_start|>user\nResult of {call.function.name}: 21 degrees and sunny<|im_end|>" in prompt

    for broken, param in (({"role": "tool", "content": "21"}, "messages[2].tool_call_id"),
                          ({"role": "assistant", "content": None, "tool_calls": [
                              {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{"}}]},
                           "messages[2].tool_calls[0].function.arguments")):
        response = post(server, {"messages": [*USER, {"role": "assistant", "content": "ok"}, broken]})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
