"""The terminal chat: a conversation with streaming replies, kept in history until /reset."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from sparkgpt.errors import SparkGPTError
from sparkgpt.lm import LM

DEFAULT_REPLY_TOKENS = 512  # a terminal reply's length when none is asked for
HELP = "/reset clears the conversation, /exit quits; Ctrl-C stops a reply, Ctrl-D quits."


def user_turn(text: str, image_url: str | None = None) -> dict[str, Any]:
    """A user message: its text, with an image (a data URL, `images.image_data_url`) as OpenAI content parts."""
    if image_url is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


def chat_session(
    lm: LM, system: str | None = None, read_line: Callable[[str], str] = input, out: TextIO = sys.stdout,
    image_url: str | None = None, **sampling: Any,
) -> list[dict[str, Any]]:
    """Run the read-reply loop until /exit or end of input; returns the conversation as it stood. With
    `image_url` the conversation's first user turn carries that image (every question is then about it)."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    print(HELP, file=out)
    while True:
        try:
            line = read_line(">> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return history
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return history
        if line == "/reset":
            history = list(start)
            print("(conversation cleared)", file=out)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=out)
            continue
        first = not any(message["role"] == "user" for message in history)
        history.append(user_turn(line, image_url if first else None))
        reply = stream_reply(lm, history, out, **sampling)
        if reply is None:
            history.pop()  # the turn could not be answered (e.g. the conversation outgrew the context)
        else:
            history.append({"role": "assistant", "content": reply})


def stream_reply(lm: LM, messages: list[dict[str, Any]], out: TextIO, **sampling: Any) -> str | None:
    """Print the assistant's reply as it is generated; Ctrl-C stops it early and keeps what was said. Without
    `max_new_tokens` the reply may take DEFAULT_REPLY_TOKENS, or what the context has left when that is less."""
    pieces: list[str] = []
    try:
        if sampling.get("max_new_tokens") is None:
            room = lm.reply_room(lm.chat_inputs(messages)[0])
            sampling = {**sampling, "max_new_tokens": max(1, min(DEFAULT_REPLY_TOKENS, room))}
        for delta in lm.chat_stream(messages, **sampling):
            pieces.append(delta)
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    except SparkGPTError as error:
        print(f"error: {error} (try /reset)", file=out)
        return None
    out.write("\n")
    return "".join(pieces)
