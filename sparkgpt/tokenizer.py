"""Tokenizer: text <-> token ids over the HF `tokenizers` library, plus incremental decoding for streaming."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object, write_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template a checkpoint carries beside it."""

    def __init__(
        self,
        backend: BackendTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise SparkGPTError(f"{path}: no tokenizer file (expected a Hugging Face tokenizer.json)")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises a bare Exception for malformed files
            raise SparkGPTError(f"{path}: not a valid tokenizer.json ({str(error).splitlines()[0]})") from None
        settings_path = directory / TOKENIZER_CONFIG_FILE
        settings = read_json_object(settings_path) if settings_path.is_file() else {}
        return cls(
            backend,
            bos_token=_token_text(settings.get("bos_token")),
            eos_token=_token_text(settings.get("eos_token")),
            chat_template=settings.get("chat_template"),
        )

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.backend.save(str(directory / TOKENIZER_FILE))
        settings = {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token, "eos_token": self.eos_token
        }
        if self.chat_template is not None:
            settings["chat_template"] = self.chat_template
        write_json(directory / TOKENIZER_CONFIG_FILE, settings)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns token ids, one at a time, into text deltas that are always whole UTF-8 characters.

    A byte-level token can end in the middle of a multi-byte character; decoding then yields U+FFFD. We hold
    such text back until a later token completes it. Decoding a short window (from `prefix_offset`) rather than
    the whole sequence keeps each step cheap, and diffing two decodes of the same window keeps decoders that
    strip a leading space (SentencePiece) from eating real spaces.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Add a token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


def _token_text(value: object) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None

