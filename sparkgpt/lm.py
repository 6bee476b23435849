"""LM: a model with its tokenizer, the object users hold (`sparkgpt.load(ref)`)."""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sparkgpt import hardware
from sparkgpt.checkpoint import load as checkpoint_load
from sparkgpt.data.batch import pad_rows
from sparkgpt.data.examples import ClassifyBatch
from sparkgpt.data.images import image_from_url, preprocess_images
from sparkgpt.errors import FieldError, SparkGPTError
from sparkgpt.generate import Completion, SamplingParams, stream_completions
from sparkgpt.model.heads import SequenceClassifier
from sparkgpt.model.transformer import GPT, Encoder, EncoderDecoder
from sparkgpt.model.vision import ImageText
from sparkgpt.tokenizer import Tokenizer


class LM:
    """A language model ready to use: `generate`, `stream`, `save`; `model` and `tokenizer` stay reachable."""

    def __init__(self, model: GPT, tokenizer: Tokenizer | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # embed's bf16 copy and its timed choice (`embedding_dtype`), each with what it was made from
        self._bf16_copy: tuple[Any, Encoder] | None = None
        self._embedding_choice: tuple[Any, str] | None = None
        self._copy_lock, self._embedding_lock = threading.RLock(), threading.Lock()

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
        self, prompts: Sequence[str | list[int]], images: Sequence[Image.Image | str | Path] | None = None,
        **sampling: Any,
    ) -> Iterator[tuple[int, str, Completion | None]]:
        """(prompt index, text delta, Completion when that prompt is done) as tokens are generated.

        A prompt is text, or token ids already encoded (as `chat` does with its rendered template). An image-to-text
        model takes `images` (PIL images or files), one per prompt, each prompt a question about its image; every
        prompt of one call must then have the same number of tokens."""
        if not isinstance(self.model, (GPT, EncoderDecoder)):
            raise SparkGPTError(f"this model cannot generate text: it is {type(self.model).__name__} "
                                f"({self.config.architecture!r}), not a decoder with a language-model head")
        pixels = None
        if isinstance(self.model, ImageText) != (images is not None):
            raise SparkGPTError("an image-to-text model answers about images: pass images, one per prompt"
                                if images is None else "this model does not read images (it has no image encoder)")
        if images is not None:
            if len(images) != len(prompts):
                raise SparkGPTError(f"{len(images)} images for {len(prompts)} prompts; expected one per prompt")
            device = self.model.lm_head.weight.device
            pixels = preprocess_images(list(images), self.model.preprocessing).to(device)
            if list(pixels.shape[1:]) != self.model.patch_embeddings.expected:
                raise SparkGPTError(f"the model's preprocessing makes images of {list(pixels.shape[1:])}; it reads "
                                    f"{self.model.patch_embeddings.expected}")
        params = SamplingParams(**sampling)
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return stream_completions(self.model, self._require_tokenizer(), ids, params, self.stop_token_ids(), pixels)

    def complete(self, prompts: Sequence[str | list[int]], images: Sequence[Image.Image | str | Path] | None = None,
                 **sampling: Any) -> list[Completion]:
        """Completions for a batch of prompts (text, new token ids, finish reason), generated together."""
        done: dict[int, Completion] = {}
        for row, _, completion in self.stream_batch(prompts, images, **sampling):
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

    def chat_inputs(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[Image.Image] | None]:
        """A conversation as the model reads it: the prompt ids (`chat_prompt`) and, for an image-to-text model,
        the image its question is about (the conversation's last). Content may be OpenAI's content parts:
        {"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}};
        a model without an image encoder refuses images, naming the part."""
        plain, images = [], []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                plain.append(message)
                continue
            texts = []
            for j, part in enumerate(content):
                field = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    if not isinstance(self.model, ImageText):
                        raise FieldError(field, f"{field}: this model does not read images (it has no image encoder)")
                    url = part.get("image_url")
                    try:
                        images.append(image_from_url(url.get("url") if isinstance(url, dict) else url, field))
                    except SparkGPTError as error:
                        raise FieldError(field, str(error)) from None
                else:
                    raise FieldError(field, f"{field}: expected a content part of type 'text' (with 'text') or "
                                     "'image_url'")
            plain.append({**message, "content": "".join(texts)})
        if isinstance(self.model, ImageText):
            if not images:
                raise SparkGPTError("messages: an image-to-text model answers about an image; add an image_url "
                                    "content part")
            return self.chat_prompt(plain), images[-1:]
        return self.chat_prompt(plain), None

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

    def reply_room(self, prompt: Sequence[int]) -> int:
        """How many tokens may follow `prompt` within the model's context (an encoder–decoder's decoder also holds
        its start token)."""
        start = 1 if isinstance(self.model, EncoderDecoder) else 0
        return self.config.max_seq_len - len(prompt) - start

    def chat(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> str:
        """The assistant's reply to a conversation: [{"role": "system"|"user"|"assistant", "content": ...}, ...];
        content is text, or content parts with images for an image-to-text model (`chat_inputs`)."""
        prompt, images = self.chat_inputs(messages)
        return self.complete([prompt], images, **sampling)[0].text

    def chat_stream(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Iterator[str]:
        """The assistant's reply as text deltas."""
        prompt, images = self.chat_inputs(messages)
        for _, delta, _ in self.stream_batch([prompt], images, **sampling):
            if delta:
                yield delta

    def embed(self, texts: str | Sequence[str], batch_size: int = 32, dtype: str | None = None) -> torch.Tensor:
        """Sentence embeddings of an encoder model (BERT, MiniLM): the mean of each text's token vectors,
        L2-normalised, as float32 [N, d_model] (a single str gives [d_model]). Texts longer than the model's
        context keep their first tokens and their final special token.

        dtype: what the encoder computes in. None: the weights' own (float32 weights give the reference's vectors);
        "bfloat16": a bf16 copy of the weights, made on first use and again whenever the weights change
        (2 bytes a parameter); "auto": whichever of the two `embedding_dtype` timed faster here, as indexing uses."""
        if not isinstance(self.model, Encoder):
            raise SparkGPTError(f"embed needs an encoder model (architecture 'encoder', e.g. minilm-l6); this one is "
                                f"{self.config.architecture!r}")
        if dtype not in (None, "auto", "bfloat16"):
            raise SparkGPTError(f"embed: dtype {dtype!r} is not one of None, 'auto', 'bfloat16'")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            raise SparkGPTError("embed: no texts given")
        tokenizer, limit = self._require_tokenizer(), self.config.max_seq_len
        encoded = [tokenizer.encode(text) for text in texts]
        encoded = [ids if len(ids) <= limit else ids[:limit - 1] + ids[-1:] for ids in encoded]
        bf16 = (self.embedding_dtype if dtype == "auto" else dtype) == "bfloat16"
        model = self._bf16_encoder() if bf16 else self.model
        device = model.embeddings.token_embedding.weight.device
        # Batches of similar lengths waste little compute on padding; the rows go back to the texts' order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        embeddings = torch.empty(len(encoded), self.config.d_model)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                ids, mask = pad_rows([encoded[i] for i in rows], self.config.pad_token_id or 0)
                embeddings[rows] = model.sentence_embeddings(ids.to(device), mask.to(device)).cpu()
        return embeddings[0] if single else embeddings

    @property
    def embedding_dtype(self) -> str:
        """What `embed(..., dtype="auto")` computes in: "bfloat16" where the encoder as a bf16 copy, timed once
        against float32 on this CPU (and cached beside the native builds), runs faster; else "float32". bf16 moves
        the vectors slightly (RESULTS.md, retrieval), so it is taken only where it pays. Weights already in a lower
        precision are used as they are; a CUDA GPU takes bf16 where it multiplies it natively."""
        weights = self.model.embeddings.token_embedding.weight
        key = (_Same(self.model), weights.device, weights.dtype)
        with self._embedding_lock:
            if self._embedding_choice is None or self._embedding_choice[0] != key:
                self._embedding_choice = key, self._choose_embedding_dtype()
            return self._embedding_choice[1]

    def _choose_embedding_dtype(self) -> str:
        weights = self.model.embeddings.token_embedding.weight
        decision = "sentence embeddings' dtype"
        if weights.dtype != torch.float32:
            return hardware.note(decision, str(weights.dtype).removeprefix("torch."), "the weights' own dtype")
        if weights.device.type == "cuda":
            bf16 = hardware.cuda_bf16(weights.device)
            return hardware.note(decision, "bfloat16" if bf16 else "float32",
                                 "the GPU multiplies bf16 natively" if bf16 else "the GPU has no native bf16")
        if weights.device.type != "cpu" or not hardware.cpu().native_bf16:
            return hardware.note(decision, "float32", "no bf16 instructions here")
        config = self.config
        ids = torch.randint(0, config.vocab_size, (32, min(128, config.max_seq_len)),
                            generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[16:, ids.shape[1] // 2:] = 0  # padded rows, as real batches have: they take the masked attention

        def run(model: Callable[[], Encoder]) -> Callable[[], None]:
            def embed_batch() -> None:
                with torch.inference_mode():
                    model().sentence_embeddings(ids, mask)
            return embed_batch

        shape = (f"{config.n_layers}×{config.d_model}×{config.d_ff or 4 * config.d_model}, "
                 f"{config.n_heads} heads")
        with self._copy_lock:
            chosen = hardware.fastest(decision, f"embedding dtype {shape}",
                                      {"float32": run(lambda: self.model), "bfloat16": run(self._bf16_encoder)})
            if chosen == "float32":
                self._bf16_copy = None  # timed slower here: its memory goes back
        return chosen

    def _bf16_encoder(self) -> Encoder:
        """A bfloat16 copy of the encoder, remade when the weights change (a training step, a merged adapter, a
        move to another device). bf16 weights ran faster than bf16 autocast over the float32 ones, which casts
        activations at every norm (RESULTS.md, retrieval)."""
        weights = self.model.embeddings.token_embedding.weight
        if weights.dtype == torch.bfloat16:
            return self.model
        with self._copy_lock:
            source = (_Same(self.model), weights.device,
                      tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in self.model.parameters()))
            if self._bf16_copy is None or self._bf16_copy[0] != source:
                self._bf16_copy = None  # the old copy's memory goes before the new one is made
                self._bf16_copy = source, copy.deepcopy(self.model).to(torch.bfloat16).eval()
            return self._bf16_copy[1]

    def classify(self, texts: str | Sequence[str], batch_size: int = 16) -> dict[str, float] | list[dict[str, float]]:
        """Label probabilities from a trained classification head (`sparkgpt finetune --task classify`):
        {label: probability} for a text, or a list of them for a list of texts. Long texts keep their first tokens."""
        if not isinstance(self.model, SequenceClassifier):
            raise SparkGPTError("this model has no classification head (fine-tune one with `sparkgpt finetune "
                                "--task classify`); for zero-shot labels use sparkgpt.tasks.classify")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        tokenizer, limit = self._require_tokenizer(), self.config.max_seq_len
        encoded = [(tokenizer.encode(text) or [self.config.bos_token_id or 0])[:limit] for text in texts]
        device = self.model.score.weight.device
        results = []
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                inputs = ClassifyBatch.of(encoded[start:start + batch_size], pad=0).to(device)  # pads are unread
                probabilities = torch.softmax(self.model(*inputs.model_args()).float(), dim=-1).cpu()
                results += [dict(zip(self.model.labels, row.tolist(), strict=True)) for row in probabilities]
        return results[0] if single else results

    def save(self, out_dir: str | Path) -> Path:
        """Write an HF-compatible checkpoint directory (atomically: a crash leaves any old one intact). LoRA
        adapters kept separate (`load(..., merge=False)`) are saved merged into the weights."""
        return checkpoint_load.save(out_dir, self.model, self.tokenizer)


def load(
    ref: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto",
    adapter: str | Path | None = None, merge: bool = True, quantize: str | None = None,
) -> LM:
    """Load a model reference as an LM: a checkpoint directory (ours or transformers'), a .gguf file, an alias
    (`sparkgpt.checkpoint.registry.ALIASES`) or a Hugging Face hub id. GGUF weights are dequantised to `dtype`.

    A LoRA adapter folder (adapter_config.json: ours or PEFT's) loads the base model it names with the adapter
    applied; `adapter` applies one to any base reference. With `merge` the adapter's update is added into the base
    weights (the same outputs at no extra cost per token); without, the adapter layers stay separate.

    `quantize` ("int8" or "int4", `sparkgpt.model.quant`) stores the weight matrices as integers with scales:
    about 4x / 7x smaller and several times faster to decode on a CPU. A checkpoint written quantised loads as
    it was saved; GGUF 4-bit blocks become int4 directly. Its activations are `dtype`: bfloat16 prefills a
    quantised model about 1.4x faster on a CPU (the decode kernels take bf16 rows either way), float32 keeps each
    served request's text exactly what it would be alone."""
    lm = LM(*checkpoint_load.load(ref, dtype, device, adapter, merge, quantize))
    hardware.release_idle_threads()  # the thread that generates with it may be another (a server's engine)
    return lm


class _Same:
    """Equal only to a _Same of the very same object (held weakly): a key for what a cached result was made from,
    which a new object at a reused id() never matches."""

    def __init__(self, target: Any) -> None:
        self.target = weakref.ref(target)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and self.target() is not None and self.target() is other.target()

    __hash__ = None  # type: ignore[assignment]
