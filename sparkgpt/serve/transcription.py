"""POST /v1/audio/transcriptions for a served Whisper model, in OpenAI's shape.

The request is a multipart form: `file` (the audio: any format soundfile reads), `model`, and optionally
`language` (Whisper's code: en, fr, ...; default en) and `response_format` (json: {"text": ...}, or text). The
body limit (`RequestGuard`, --max-body-bytes) bounds the upload: a larger one is a 413. An unreadable file, an
unknown language or format is a 400 naming its field. The decode itself (`sparkgpt.tasks.transcribe`) blocks on
the model, so the HTTP layer runs `Transcriber.transcribe` in its worker thread.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from sparkgpt.errors import SparkGPTError
from sparkgpt.lm import LM
from sparkgpt.serve.protocol import APIError, invalid
from sparkgpt.tasks.transcribe import DEFAULT_BEAM_SIZE, transcribe, whisper_prompt

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
FIELDS = ("file", "model", "language", "response_format")
RESPONSE_FORMATS = ("json", "text")


@dataclass(frozen=True)
class TranscriptionRequest:
    audio: bytes
    filename: str
    language: str
    response_format: str


async def read_form(request: Request, served: str) -> TranscriptionRequest:
    """The form's fields, checked: one file, the served model's name, a known response format."""
    async with request.form(max_files=1, max_fields=len(FIELDS)) as form:
        return await _checked(form, served)


async def _checked(form: FormData, served: str) -> TranscriptionRequest:
    for name in form:
        if name not in FIELDS:
            raise invalid(name, f"Unrecognized request argument supplied: {name}")
    upload, model = form.get("file"), form.get("model")
    if not isinstance(upload, UploadFile):
        raise invalid("file", "you must provide the audio as a file upload in the form field 'file'")
    if not isinstance(model, str) or not model:
        raise invalid("model", "you must provide a model parameter")
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist (this server serves '{served}').", param="model",
                       code="model_not_found")
    language, response_format = form.get("language") or "en", form.get("response_format") or "json"
    if not isinstance(language, str):
        raise invalid("language", "'language' must be a string.")
    if response_format not in RESPONSE_FORMATS:
        raise invalid("response_format", f"response_format {response_format!r} is not supported; expected one of "
                      f"{', '.join(RESPONSE_FORMATS)}")
    return TranscriptionRequest(await upload.read(), upload.filename or "audio", language, str(response_format))


class Transcriber:
    """What serves a Whisper LM: one request's audio to its transcript."""

    def __init__(self, lm: LM, beam_size: int = DEFAULT_BEAM_SIZE) -> None:
        whisper_prompt(lm)  # a text model is refused here, at load
        self.lm, self.beam_size = lm, beam_size
        self.device = lm.model.lm_head.weight.device

    def transcribe(self, request: TranscriptionRequest) -> str:
        try:
            whisper_prompt(self.lm, request.language)
        except SparkGPTError as error:
            raise invalid("language", str(error)) from None
        suffix = "".join(re.findall(r"[A-Za-z0-9]", Path(request.filename).suffix))[:8]
        with tempfile.TemporaryDirectory(prefix="sparkgpt-audio-") as folder:
            path = Path(folder) / f"upload.{suffix or 'audio'}"
            path.write_bytes(request.audio)
            try:
                return transcribe(self.lm, path, language=request.language, beam_size=self.beam_size)
            except SparkGPTError as error:  # the message names the temporary file: name the upload instead
                message = str(error).replace(str(path), request.filename)
                raise invalid("file", message, code="invalid_audio") from None


def transcription_response(text: str, response_format: str) -> Response:
    if response_format == "text":
        return PlainTextResponse(text)
    return JSONResponse({"text": text})
