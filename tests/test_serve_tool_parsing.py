"""`tool_choice: "auto"` (issue 23): the tool calls a free reply makes are read out of it, in sparkgpt's generic
JSON format or in Hermes/Qwen `<tool_call>` blocks; anything else stays text.

The parser is tested on written replies; then a real server with the official client. A tiny random model says
nothing useful, so `guided_choice` makes it say exactly the reply under test, and the server reads it as any model's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from sparkgpt import Tokenizer
from sparkgpt.serve.protocol import plain_tool_history
from sparkgpt.serve.tool_calls import TOOL_CALL_OPEN, ToolCallReply, parse_tool_calls, streamable
from tests.test_serve import API_KEY, MODEL, USER, Server, one_torch_thread, tiny_lm  # noqa: F401 (a fixture)

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, SEARCH]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
NEWS = {"name": "search", "arguments": {"query": "news", "limit": 3}}


def written(call: dict[str, Any]) -> str:
    return json.dumps(call)


def hermes(call: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


# ---- the parser ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "expected"), [
    (written(PARIS), ToolCallReply(None, [PARIS])),
    (f"  {written(PARIS)}\n", ToolCallReply(None, [PARIS])),
    (f"```json\n{written(PARIS)}\n```", ToolCallReply(None, [PARIS])),
    (f"```\n{written(NEWS)}\n```", ToolCallReply(None, [NEWS])),
    (f"{written(PARIS)}\n{written(NEWS)}", ToolCallReply(None, [PARIS, NEWS])),
    (hermes(PARIS), ToolCallReply(None, [PARIS])),
    (f"Let me look.\n{hermes(PARIS)}", ToolCallReply("Let me look.", [PARIS])),
    (f"Let me look.\n{hermes(PARIS)}\n{hermes(NEWS)}\nBack soon.", ToolCallReply("Let me look.\nBack soon.",
                                                                                 [PARIS, NEWS])),
    (f"<tool_call>{written(NEWS)}", ToolCallReply(None, [NEWS])),  # a last block may lack its closing tag
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', ToolCallReply(None, [PARIS])),  # Llama 3's key
])
def test_a_reply_that_calls_tools_gives_its_calls_and_the_text_around_them(reply: str, expected: ToolCallReply):
    assert parse_tool_calls(reply, TOOLS) == expected


@pytest.mark.parametrize("reply", [
    "The weather in Paris is fine.",
    "",
    written({"name": "get_time", "arguments": {}}),                       # not one of the request's tools
    hermes({"name": "get_time", "arguments": {}}),
    f"{hermes(PARIS)}\n{hermes({'name': 'get_time', 'arguments': {}})}",  # one bad call spoils the reply
    '{"name": "get_weather", "arguments": {"city": "Paris"}',             # malformed JSON
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
    f"{hermes(PARIS)}<tool_call>{{\"name\": \"search\"",                     # a last call cut short
    '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',  # arguments not an object
    '{"name": "get_weather", "arguments": ["Paris"]}',
    '{"name": "get_weather"}',
    '{"name": ["get_weather"], "arguments": {}}',
    '{"city": "Paris"}',
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    f"Sure: {written(PARIS)}",                                            # the generic format is the whole reply
    f"{written(PARIS)} and then some",
    f"<tool_call>{written(PARIS)} {written(NEWS)}</tool_call>",          # a block holds one call
    '{"name": "search", "arguments": {"limit": NaN}}',                   # not JSON a client can read
    '{"name": "search", "arguments": {"query": "\\ud800"}}',              # a lone surrogate: not text
    '{"name": "search", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}",
])
def test_a_reply_that_makes_no_valid_call_stays_text(reply: str):
    assert parse_tool_calls(reply, TOOLS) is None


def test_the_generic_format_reads_back_the_calls_plain_tool_history_writes():
    calls = [{"id": f"call_{i}", "type": "function", "function": call} for i, call in enumerate([PARIS, NEWS])]
    (turn,) = plain_tool_history([{"role": "assistant", "content": "", "tool_calls": calls}])
    assert parse_tool_calls(turn["content"], TOOLS) == ToolCallReply(None, [PARIS, NEWS])


@pytest.mark.parametrize(("reply", "expected"), [
    ("", 0), ("  ", 0), ("Hello", 5), ("{", 0), (' {"name"', 0), ("```json", 0), ("Hi <", 3), ("Hi <tool_c", 3),
    (f"Hi {TOOL_CALL_OPEN}{{", 3), ("Hi <b>", 6), ("a < b", 5),
])
def test_streaming_holds_back_only_what_may_begin_a_call(reply: str, expected: int):
    assert streamable(reply) == expected


def test_what_streams_only_grows_with_the_reply():
    reply = f"Let me look <b>now</b>.\n{hermes(PARIS)}\nBack soon."
    ready = [streamable(reply[:end]) for end in range(len(reply) + 1)]
    assert ready == sorted(ready) and ready[-1] == reply.index(TOOL_CALL_OPEN)


# ---- a real server ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A long context: the tools' description in the system message makes a prompt of hundreds of tokens.
    checkpoint = tiny_lm(tokenizer, max_seq_len=2048).save(tmp_path_factory.mktemp("serve") / "tiny-chat")
    server = Server(checkpoint, "--api-key", API_KEY, "--model-name", MODEL,
                    log=tmp_path_factory.mktemp("logs") / "tool-parsing.log")
    yield server
    server.close()


def ask(server: Server, reply: str, stream: bool = False, max_tokens: int = 300, **options: Any) -> Any:
    """A chat with TOOLS whose model says exactly `reply` (greedy, forced by a one-string guided_choice)."""
    return server.client().chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, max_tokens=max_tokens, temperature=0, stream=stream,
        extra_body={"guided_choice": [reply]}, **options)


def streamed(chunks: list[Any]) -> tuple[list[str], list[Any], str | None]:
    """A stream's content deltas, tool_calls deltas and finish reason."""
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    contents = [delta.content for delta in deltas if delta.content]
    calls = [call for delta in deltas for call in delta.tool_calls or []]
    return contents, calls, chunks[-1].choices[0].finish_reason


def read(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    return {"name": call.function.name, "arguments": json.loads(call.function.arguments)}


@pytest.mark.parametrize(("reply", "content", "calls"), [
    (written(PARIS), None, [PARIS]),
    (f"```json\n{written(NEWS)}\n```", None, [NEWS]),
    (f"Let me look.\n{hermes(PARIS)}\n{hermes(NEWS)}\nBack soon.", "Let me look.\nBack soon.", [PARIS, NEWS]),
])
@pytest.mark.parametrize("tool_choice", ["auto", None])  # "auto" is the default
def test_an_auto_reply_that_calls_tools_answers_tool_calls_streamed_or_not(server: Server, reply: str,
                                                                         content: str | None,
                                                                         calls: list[dict[str, Any]],
                                                                         tool_choice: str | None):
    options = {} if tool_choice is None else {"tool_choice": tool_choice}
    choice = ask(server, reply, **options).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == content
    assert [read(call) for call in choice.message.tool_calls] == calls

    contents, deltas, finish_reason = streamed(list(ask(server, reply, stream=True, **options)))
    assert finish_reason == "tool_calls" and [delta.index for delta in deltas] == list(range(len(calls)))
    assert [read(delta) for delta in deltas] == calls
    assert ("".join(contents) or None) == content  # the text before the first call streamed as it came
    assert not any(TOOL_CALL_OPEN in text or "{" in text for text in contents)


@pytest.mark.parametrize("reply", [
    "The weather in Paris is fine, I think.",
    written({"name": "get_time", "arguments": {}}),
    f"Let me look.\n{hermes({'name': 'get_weather', 'arguments': 'Paris'})}",
])
def test_an_auto_reply_that_makes_no_valid_call_stays_content_streamed_or_not(server: Server, reply: str):
    choice = ask(server, reply).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == reply and choice.message.tool_calls is None
    contents, deltas, finish_reason = streamed(list(ask(server, reply, stream=True)))
    assert finish_reason == "stop" and not deltas and "".join(contents) == reply


def test_plain_text_still_streams_token_by_token_when_tools_are_offered(server: Server):
    reply = "The weather in Paris is fine, I think."
    contents, _, _ = streamed(list(ask(server, reply, stream=True)))
    assert len(contents) > 5 and "".join(contents) == reply


def test_a_call_under_tool_choice_none_or_cut_by_max_tokens_stays_text(server: Server):
    reply = hermes(PARIS)
    choice = ask(server, reply, tool_choice="none").choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == reply and choice.message.tool_calls is None
    cut = ask(server, written(PARIS), max_tokens=5).choices[0]
    assert cut.finish_reason == "length" and cut.message.tool_calls is None and cut.message.content
