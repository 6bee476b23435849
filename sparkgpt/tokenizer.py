"""Tokenizer: text <-> token ids over the HF `tokenizers` library, plus incremental decoding for streaming."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
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
    def char_level(cls, texts: Iterable[str], special_tokens: Iterable[str] = ()) -> Tokenizer:
        """One token per distinct character of `texts` (nanoGPT's Shakespeare tokenizer), ids in sorted order."""
        characters = sorted(set().union(*(set(text) for text in texts)))
        vocab = {character: index for index, character in enumerate(characters)}
        backend = BackendTokenizer(models.WordLevel(vocab, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a word
        backend.decoder = decoders.Fuse()  # WordLevel decoding would put a space between characters
        specials = list(special_tokens)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(backend, eos_token=specials[0] if specials else None)

    @classmethod
    def train_bpe(
        cls, texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = ("<|endoftext|>",),
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train a byte-level BPE (GPT-2's scheme: any text encodes, nothing is ever unknown) on `texts`."""
        specials = list(special_tokens)
        if vocab_size < 256 + len(specials):
            raise SparkGPTError(f"bpe vocabulary size {vocab_size} is too small; byte-level BPE needs at least "
                                f"{256 + len(specials)} (256 bytes + {len(specials)} special tokens)")
        backend = BackendTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, eos_token=specials[0] if specials else None)

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
        return self._encoding(text, add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` exactly as written (no special tokens added) and each token's (start, end) characters."""
        encoding = self._encoding(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def _encoding(self, text: str, add_special_tokens: bool):
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens)
        except Exception as error:  # the Rust library raises a bare Exception (a char-level vocabulary's gaps)
            unknown = sorted({c for c in text if self.backend.token_to_id(c) is None})
            if isinstance(self.backend.model, models.WordLevel) and unknown:
                raise SparkGPTError(f"the text has characters outside this character-level vocabulary: "
                                    f"{''.join(unknown[:20])!r}") from None
            raise SparkGPTError(f"could not tokenize the text ({error})") from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """The prompt text for a conversation, rendered from the model's own Jinja chat template."""
        if self.chat_template is None:
            raise SparkGPTError("this model has no chat template (tokenizer_config.json or GGUF metadata)")
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", **variables,
        )


def render_chat_template(template: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    """Render a chat template as transformers does: Jinja in a sandbox (a template is untrusted input)."""
    try:
        compiled = _chat_environment().from_string(template)
        return compiled.render(messages=messages, **variables)
    except jinja2.TemplateError as error:
        raise SparkGPTError(f"chat template: {error}") from None


@functools.lru_cache(maxsize=1)
def _chat_environment() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


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

