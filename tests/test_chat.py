"""The terminal chat session: history, /reset, /exit, Ctrl-C stopping a reply without ending the session."""

from __future__ import annotations

import io

from sparkgpt.chat import chat_session
from sparkgpt.errors import SparkGPTError


class ScriptedLM:
    """Replies with canned text and records every conversation it was asked to continue."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.seen = []

    def chat_inputs(self, messages):
        return [0] * len(messages), None

    def reply_room(self, prompt):
        return 1000 - len(prompt)

    def chat_stream(self, messages, **sampling):
        self.sampling = sampling
        self.seen.append([dict(m) for m in messages])
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        for word in reply:
            if isinstance(word, BaseException):
                raise word
            yield word


def lines(*typed):
    queue = list(typed)

    def read_line(prompt):
        if not queue:
            raise EOFError
        return queue.pop(0)
    return read_line


def test_history_grows_and_reset_clears_it():
    lm = ScriptedLM([["Hi", " there."], ["Paris."], ["Fresh."]])
    out = io.StringIO()
    history = chat_session(lm, "Be brief.", lines("Hello", "Capital of France?", "/reset", "Again", "/exit"), out)
    assert lm.seen[1] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "Capital of France?"},
    ]
    assert lm.seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Again"}]
    assert history[-1] == {"role": "assistant", "content": "Fresh."}
    assert "Hi there.\n" in out.getvalue() and "(conversation cleared)" in out.getvalue()


def test_ctrl_c_stops_the_reply_but_not_the_session():
    lm = ScriptedLM([["Once", " upon", KeyboardInterrupt()], ["Still here."]])
    out = io.StringIO()
    history = chat_session(lm, None, lines("Tell a long story", "Are you there?"), out)
    assert history[1] == {"role": "assistant", "content": "Once upon"}
    assert history[-1] == {"role": "assistant", "content": "Still here."}
    assert "Once upon [stopped]" in out.getvalue()


def test_an_unanswerable_turn_is_reported_and_dropped():
    lm = ScriptedLM([SparkGPTError("prompt of 9000 tokens exceeds the model's context"), ["ok"]])
    out = io.StringIO()
    history = chat_session(lm, None, lines("x" * 100, "short"), out)
    assert "error: prompt of 9000 tokens exceeds the model's context (try /reset)" in out.getvalue()
    assert history == [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]


def test_unknown_command_and_ctrl_d_end_cleanly():
    out = io.StringIO()
    assert chat_session(ScriptedLM([]), None, lines("/frobnicate"), out) == []
    assert "unknown command /frobnicate" in out.getvalue()


def test_a_reply_without_max_new_tokens_takes_512_or_what_the_context_leaves():
    lm = ScriptedLM([["a"], ["b"]])
    chat_session(lm, None, lines("hi"), io.StringIO())
    assert lm.sampling["max_new_tokens"] == 512
    lm.reply_room = lambda prompt: 7
    chat_session(lm, None, lines("hi"), io.StringIO())
    assert lm.sampling["max_new_tokens"] == 7
