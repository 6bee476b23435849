"""POST /v1/chat/completions for a served image-to-text model (`ImageText`), in OpenAI's shape.

The image comes in a message as an `image_url` content part holding a base64 data URL (nothing is ever fetched);
`LM.chat_inputs` decodes it and renders the prompt, `LM.stream_batch` answers. There is no engine: the HTTP layer
runs each request whole in its worker thread, one at a time (as a transcription), so a bad image fails its own
request alone, with a 400 naming its content part (`messages[i].content[j]`). A reply streams, or comes whole,
with its usage (the prompt's text tokens; the image's patches are not tokens) and finish reason.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from sparkgpt.errors import FieldError, SparkGPTError
from sparkgpt.generate import Completion, is_int
from sparkgpt.lm import LM
from sparkgpt.model.vision import ImageText
from sparkgpt.serve.protocol import (
    STRUCTURED_FIELDS,
    TOOL_FIELDS,
    invalid,
    parse_messages,
    parse_stream,
    sampling_params,
    usage,
)

# Chat fields an image-to-text model cannot honour: refused by name rather than ignored.
UNSUPPORTED_FIELDS = (*sorted(TOOL_FIELDS), *STRUCTURED_FIELDS, "logprobs", "top_logprobs")
# Values clients send by default that ask for nothing (parallel_tool_calls means nothing without tools).
NO_OPS = (None, False, [], {"type": "text"}, "none")


@dataclass
class ImageChatCall:
    """One chat request ready to run: its reply's steps, (row, delta, Completion at the end), not yet taken."""

    steps: Generator[tuple[int, str, Completion | None], None, None]
    stream: bool
    include_usage: bool


class ImageChat:
    """What serves an image-to-text LM: one conversation about an image to the assistant's reply."""

    def __init__(self, lm: LM) -> None:
        if not isinstance(lm.model, ImageText):
            raise SparkGPTError(f"an image chat needs an image-to-text model, not {type(lm.model).__name__}")
        self.lm = lm
        self.device = lm.model.lm_head.weight.device
        self.context = lm.config.max_seq_len - 1  # the decoder's positions but the start token's: prompt and reply

    def prepare(self, body: dict[str, Any]) -> ImageChatCall:
        """The request's fields checked and its image decoded; every bad input is a 400 naming its field. Decodes
        and tokenises, so it runs off the event loop."""
        for name in UNSUPPORTED_FIELDS:
            if name != "parallel_tool_calls" and body.get(name) not in NO_OPS:
                raise invalid(name, f"'{name}' is not supported by this model: an image-to-text model answers in "
                              "free text only.", code="model_cannot_call_tools" if name in TOOL_FIELDS else None)
        n = body.get("n")
        if n is not None and not (is_int(n) and n == 1):
            raise invalid("n", f"Invalid value for 'n': {n!r}; an image-to-text model answers with one choice.")
        messages = parse_messages(body.get("messages"), reads_images=True)
        try:
            prompt, images = self.lm.chat_inputs(messages)
        except SparkGPTError as error:  # a bad content part names itself; the rest is about the messages
            raise invalid(error.field if isinstance(error, FieldError) else "messages", str(error)) from None
        max_tokens, param = body.get("max_completion_tokens"), "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = body.get("max_tokens"), "max_tokens"
        if max_tokens is None:
            max_tokens = max(1, self.context - len(prompt))
        params = sampling_params(body, max_tokens, param, self.lm.config.vocab_size)
        if len(prompt) + params.max_new_tokens > self.context:
            raise invalid("messages", f"This model's maximum context length is {self.context} tokens. However, you "
                          f"requested {len(prompt) + params.max_new_tokens} tokens ({len(prompt)} in the messages, "
                          f"{params.max_new_tokens} in the completion). Please reduce the length of the messages "
                          "or max_tokens.", code="context_length_exceeded")
        stream, include_usage = parse_stream(body)
        try:  # the image is preprocessed now, so an image it refuses is a 400 before a stream begins
            steps = self.lm.stream_batch([prompt], images, **dataclasses.asdict(params))
        except SparkGPTError as error:
            raise invalid("messages", str(error)) from None
        return ImageChatCall(steps, stream, include_usage)

    @staticmethod
    def complete(call: ImageChatCall) -> Completion:
        """The whole reply (blocks on the model)."""
        try:
            return next(completion for _, _, completion in call.steps if completion is not None)
        finally:
            call.steps.close()

    @staticmethod
    def stream(call: ImageChatCall, sink: Callable[[tuple[str, Completion | None] | Exception], None],
               cancelled: threading.Event) -> None:
        """Generate the reply, handing `sink` each (delta, Completion at the end), or the exception that ended it
        (the stream has already begun: its client hears it as an error event). Stops once `cancelled` is set,
        when the client has gone."""
        try:
            for _, delta, completion in call.steps:
                if cancelled.is_set():
                    return
                sink((delta, completion))
        except Exception as error:
            sink(error)
        finally:
            call.steps.close()


def chat_completion(response_id: str, created: int, model: str, completion: Completion) -> dict[str, Any]:
    """OpenAI's chat.completion of one reply."""
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": usage(completion.prompt_tokens, len(completion.token_ids)), "system_fingerprint": None}


def chat_chunk(response_id: str, created: int, model: str, call: ImageChatCall, delta: dict[str, Any],
               finish_reason: str | None = None) -> dict[str, Any]:
    """One chat.completion.chunk of the reply (its "usage" null when the stream ends with a usage chunk)."""
    return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **({"usage": None} if call.include_usage else {})}


def usage_chunk(response_id: str, created: int, model: str, completion: Completion) -> dict[str, Any]:
    """The stream's last chunk when `stream_options.include_usage` asks for it."""
    return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [],
            "usage": usage(completion.prompt_tokens, len(completion.token_ids))}
