"""Tool calls read out of a finished reply, as vLLM's tool parsers do for `tool_choice: "auto"` (a forced call, which
its grammar writes in the generic format, is read the same way).

Two formats count, whatever the chat template: the generic one sparkgpt asks for where the template knows no tools
(`protocol.tool_messages`: the reply is the JSON object {"name", "arguments"} alone, bare or in a ```json fence;
several such objects one after another, as `protocol.plain_tool_history` writes earlier calls), and Hermes'
`<tool_call>{"name", "arguments"}</tool_call>` blocks, which the templates of Qwen2.5, SmolLM3 and Hermes ask for,
with any text around them. Llama 3's templates ask for "parameters": it is read as "arguments".

A call counts only when it names one of the request's tools and its arguments are a JSON object (not checked against
the tool's schema: a grammar does that where a call is forced). A reply holding anything else is text, whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

TOOL_CALL_OPEN = "<tool_call>"
# A Hermes block; the last may lack its closing tag (a model that ends right after the JSON), as vLLM reads it.
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?(.*)```", re.DOTALL)
_SPACE = re.compile(r"\s*")


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")  # NaN and Infinity would make arguments no client can parse


_DECODER = json.JSONDecoder(parse_constant=_not_json)


@dataclass
class ToolCallReply:
    """A reply that calls tools: the text outside its calls (None when there is none) and each call."""

    content: str | None
    calls: list[dict[str, Any]]  # {"name": a tool's name, "arguments": a dict}


def parse_tool_calls(text: str, tools: Sequence[dict[str, Any]]) -> ToolCallReply | None:
    """The tool calls a reply makes, in either format; None when it makes none, or any call it makes is broken
    (bad JSON, a name not among `tools`, arguments that are not an object): then it stays text."""
    if TOOL_CALL_OPEN in text:
        blocks = [_json_values(block) for block in _TOOL_CALL_BLOCK.findall(text)]
        if any(parsed is None or len(parsed) != 1 for parsed in blocks):
            return None
        outside = _TOOL_CALL_BLOCK.split(text)[::2]  # split puts each block's JSON between the pieces around it
        values = [parsed[0] for parsed in blocks]
        content = "\n".join(piece.strip() for piece in outside if piece.strip()) or None
    else:
        fenced = _FENCE.fullmatch(text.strip())
        values, content = _json_values(fenced[1] if fenced else text) or [], None
    names = {tool["function"]["name"] for tool in tools}
    calls = [_call(value, names) for value in values]
    if not calls or any(call is None for call in calls):
        return None
    return ToolCallReply(content, calls)


def streamable(text: str) -> int:
    """How much of a reply so far may stream as content when its tool calls are read at the end: everything
    before where a call may begin (a leading `{` or ``` of the generic format, `<tool_call>`, or the start of one
    at the end). Only grows as the reply does."""
    if text.lstrip()[:1] in ("", "{", "`"):
        return 0
    start = text.find(TOOL_CALL_OPEN)
    if start >= 0:
        return start
    return len(text) - max((k for k in range(1, len(TOOL_CALL_OPEN)) if text.endswith(TOOL_CALL_OPEN[:k])), default=0)


def _json_values(text: str) -> list[Any] | None:
    """The JSON values `text` holds one after another, with whitespace around them; None if it holds anything else."""
    values, end = [], _SPACE.match(text).end()
    while end < len(text):
        try:
            value, end = _DECODER.raw_decode(text, end)
        except (ValueError, RecursionError):  # bad JSON, or nesting deeper than the decoder goes
            return None
        values.append(value)
        end = _SPACE.match(text, end).end()
    return values


def _call(value: Any, names: set[str]) -> dict[str, Any] | None:
    """A call {"name", "arguments"} of one of the tools `names`, or None."""
    if not (isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"] in names):
        return None
    arguments = value.get("arguments", value.get("parameters"))
    if not isinstance(arguments, dict):
        return None
    try:  # a lone surrogate escape ("\ud800") decodes, but no response can carry it
        json.dumps(arguments, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        return None
    return {"name": value["name"], "arguments": arguments}
