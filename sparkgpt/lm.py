"""LM: a model with its tokenizer, the object users hold (`sparkgpt.load(ref)`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sparkgpt.checkpoint import hf
from sparkgpt.checkpoint.registry import resolve
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_directory
from sparkgpt.generate import Completion, SamplingParams, stream_completions
from sparkgpt.model import GPT
from sparkgpt.tokenizer import TOKENIZER_FILE, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SparkGPTError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class LM:
    """A language model ready to use: `generate`, `stream`, `save`; `model` and `tokenizer` stay reachable."""

    def __init__(self, model: GPT, tokenizer: Tokenizer | None) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def config(self):
        return self.model.config

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise SparkGPTError("this model has no tokenizer (its checkpoint lacks tokenizer.json)")
        return self.tokenizer

    def encode(self, prompt: str) -> list[int]:
        ids = self._require_tokenizer().encode(prompt)
        if not ids:
            if self.config.bos_token_id is None:
                raise SparkGPTError("the prompt is empty and the model has no beginning-of-text token to start from")
            ids = [self.config.bos_token_id]
        return ids

    def stop_token_ids(self) -> list[int]:
        """End-of-text ids from the config and the tokenizer: generation ends when one is sampled."""
        eos = self.config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def stream_batch(
        self, prompts: Sequence[str | list[int]], **sampling: Any
    ) -> Iterator[tuple[int, str, Completion | None]]:
        """(prompt index, text delta, Completion when that prompt is done) as tokens are generated.

        A prompt is text, or token ids already encoded (as `chat` does with its rendered template)."""
        params = SamplingParams(**sampling)
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return stream_completions(self.model, self._require_tokenizer(), ids, params, self.stop_token_ids())

    def complete(self, prompts: Sequence[str | list[int]], **sampling: Any) -> list[Completion]:
        """Completions for a batch of prompts (text, new token ids, finish reason), generated together."""
        done: dict[int, Completion] = {}
        for row, _, completion in self.stream_batch(prompts, **sampling):
            if completion is not None:
                done[row] = completion
        return [done[row] for row in range(len(prompts))]

    def generate(self, prompt: str | Sequence[str], **sampling: Any) -> str | list[str]:
        """The continuation of a prompt (str -> str) or of each prompt of a list (list -> list)."""
        if isinstance(prompt, str):
            return self.complete([prompt], **sampling)[0].text
        return [c.text for c in self.complete(list(prompt), **sampling)]

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """The continuation as text deltas, each a whole number of UTF-8 characters."""
        for _, delta, _ in self.stream_batch([prompt], **sampling):
            if delta:
                yield delta

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A conversation rendered with the model's chat template, ready for the assistant's turn, as token ids."""
        tokenizer = self._require_tokenizer()
        # The template writes any beginning-of-text token itself, so the tokenizer must not add another.
        return tokenizer.encode(tokenizer.apply_chat_template(list(messages)), add_special_tokens=False)

    def uses_chat_template(self, chat: bool | None = None) -> bool:
        """Whether prompts go through the chat template: `chat` if given, else whenever the model has one."""
        has_template = self.tokenizer is not None and self.tokenizer.chat_template is not None
        if chat and not has_template:
            raise SparkGPTError("this model has no chat template")
        return has_template if chat is None else chat

    def instruction_prompt(self, text: str, chat: bool | None = None) -> str:
        """A request as the model expects it: the user's turn of its chat template, or the text itself."""
        if not self.uses_chat_template(chat):
            return text
        return self._require_tokenizer().apply_chat_template([{"role": "user", "content": text}])

    def chat(self, messages: Sequence[dict[str, str]], **sampling: Any) -> str:
        """The assistant's reply to a conversation: [{"role": "system"|"user"|"assistant", "content": ...}, ...]."""
        return self.complete([self.chat_prompt(messages)], **sampling)[0].text

    def chat_stream(self, messages: Sequence[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """The assistant's reply as text deltas."""
        for _, delta, _ in self.stream_batch([self.chat_prompt(messages)], **sampling):
            if delta:
                yield delta

    def embed(self, texts: str | Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Sentence embeddings of an encoder model (BERT, MiniLM): the mean of each text's token vectors,
        L2-normalised, as float32 [N, d_model] (a single str gives [d_model]). Texts longer than the model's
        context keep their first tokens and their final special token."""
        from sparkgpt.model import Encoder

        if not isinstance(self.model, Encoder):
            raise SparkGPTError(f"embed needs an encoder model (architecture 'encoder', e.g. minilm-l6); this one is "
                                f"{self.config.architecture!r}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            raise SparkGPTError("embed: no texts given")
        tokenizer, limit = self._require_tokenizer(), self.config.max_seq_len
        encoded = [tokenizer.encode(text) for text in texts]
        encoded = [ids if len(ids) <= limit else ids[:limit - 1] + ids[-1:] for ids in encoded]
        device = self.model.embeddings.token_embedding.weight.device
        pad = self.config.pad_token_id or 0
        rows = []
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start:start + batch_size]
                longest = max(len(ids) for ids in batch)
                ids = torch.full((len(batch), longest), pad, dtype=torch.long)
                mask = torch.zeros(len(batch), longest, dtype=torch.long)
                for row, tokens in enumerate(batch):
                    ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                    mask[row, :len(tokens)] = 1
                rows.append(self.model.sentence_embeddings(ids.to(device), mask.to(device)).cpu())
        embeddings = torch.cat(rows)
        return embeddings[0] if single else embeddings

    def save(self, out_dir: str | Path) -> Path:
        """Write an HF-compatible checkpoint directory (atomically: a crash leaves any old one intact)."""
        with atomic_directory(out_dir) as staging:
            hf.write_checkpoint(staging, self.config, self.model.state_dict())
            if self.tokenizer is not None:
                self.tokenizer.save(staging)
        return Path(out_dir)


def load(ref: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto") -> LM:
    """Load a model reference as an LM: a checkpoint directory (ours or transformers'), a .gguf file, an alias
    (`sparkgpt.checkpoint.registry.ALIASES`) or a Hugging Face hub id. GGUF weights are dequantised to `dtype`."""
    path = resolve(ref)
    dtype, device = pick_dtype(dtype), pick_device(device)
    if path.is_file():
        from sparkgpt.checkpoint import gguf

        file = gguf.read_gguf(path)
        tokenizer = Tokenizer.from_gguf_metadata(file.metadata, source=str(path))
        return LM(gguf.load_gguf_model(file, dtype=dtype, device=device), tokenizer)
    model = hf.load_model(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(path) if (path / TOKENIZER_FILE).is_file() else None
    if tokenizer is not None:
        # A tokenizer.json may carry fixed padding and truncation (MiniLM's: 128); transformers overrides them per
        # call, and so do we: a text encodes whole, and batches are padded by the code that batches them.
        tokenizer.backend.no_padding()
        tokenizer.backend.no_truncation()
    return LM(model, tokenizer)
