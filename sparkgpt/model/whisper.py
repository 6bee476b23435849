"""Whisper (Radford et al. 2022): speech recognition as an encoder–decoder Transformer over log-mel frames.

    x = GELU(Conv1d_k3,s2(GELU(Conv1d_k3(mel)))) + S        S: fixed sinusoids, one per 20 ms frame (1,500 in 30 s)
    memory = EncoderBlocks(x)                               pre-norm, bidirectional
    logits = DecoderBlocks(E[token] + P[position], memory) Eᵀ   learned positions, cross-attention, tied head

Everything after the convolutional stem is the existing EncoderDecoder: pre-LayerNorm blocks, exact-GELU FFN,
cross-attention and the KV cache; decoding, greedy or beam search, is `sparkgpt.generate.whisper_decode`.
Whisper's key projections have no bias; a zero bias is the same attention (a constant added to every key shifts
each query's scores equally, and softmax ignores it), so the shared blocks serve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.model.transformer import EncoderDecoder

# Whisper's fixed architectural choices; the sizes come from the checkpoint.
WHISPER_FIXED: dict[str, Any] = dict(
    architecture="encoder-decoder", positions="learned", norm="layernorm", norm_eps=1e-5, ffn="gelu_exact",
    bias=True, qkv_bias=True, norm_position="pre", final_norm=True, tie_embeddings=True, scale_embeddings=False,
)


@dataclass
class WhisperConfig(ModelConfig):
    """A ModelConfig (the decoder's and the encoder blocks' shape; max_seq_len is the decoder's 448 positions) with
    the audio front end and the tokens Whisper's decoding never emits."""

    n_mels: int = 80
    n_audio_ctx: int = 1500  # encoder positions: mel frames after the stride-2 convolution (30 s)
    suppress_tokens: list[int] = field(default_factory=list)  # never generated
    begin_suppress_tokens: list[int] = field(default_factory=list)  # not as the first token (blank, end of text)

    def validate(self) -> None:
        super().validate()
        for name in ("n_mels", "n_audio_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SparkGPTError(f"config field {name!r} is {value!r}; expected a positive integer")
        if self.architecture != "encoder-decoder":
            raise SparkGPTError(f"a Whisper config needs architecture 'encoder-decoder', not {self.architecture!r}")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            ids = getattr(self, name)
            if not isinstance(ids, list) or any(not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
                raise SparkGPTError(f"config field {name!r} must list token ids below vocab_size {self.vocab_size}")

    def replace(self, **changes: Any) -> WhisperConfig:
        return WhisperConfig.from_dict({**self.to_dict(), **changes})


def whisper_config(**sizes: Any) -> WhisperConfig:
    """A WhisperConfig of the given sizes (vocab_size, d_model, n_layers, ...) with Whisper's fixed choices."""
    return WhisperConfig.from_dict({**WHISPER_FIXED, **sizes}, source="whisper config")


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's encoder positions [length, channels]: sines of every frequency, then cosines (not interleaved),
    with timescales geometric from 1 to 10,000 over the channels / 2 frequencies."""
    increment = math.log(10000) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Whisper(EncoderDecoder):
    """Log-mel features [B, n_mels, ≤ 2·n_audio_ctx] and target ids [B, T] -> next-token logits [B, T, vocab]."""

    config: WhisperConfig

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__(config)
        self.conv1 = nn.Conv1d(config.n_mels, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        # Fixed, never trained; a buffer in the state dict because checkpoints carry it.
        self.register_buffer("audio_positions", sinusoids(config.n_audio_ctx, config.d_model))

    def encode(self, mel: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Features [B, n_mels, frames] -> memory [B, frames / 2, d_model] (every frame is real: no mask)."""
        if mel.dim() != 3 or mel.shape[1] != self.config.n_mels:
            raise SparkGPTError(f"expected log-mel features [batch, {self.config.n_mels}, frames], got "
                                f"{list(mel.shape)}")
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel.to(self.conv1.weight.dtype))))).transpose(1, 2)
        if x.shape[1] > self.config.n_audio_ctx:
            raise SparkGPTError(f"{mel.shape[2]} mel frames exceed the encoder's {2 * self.config.n_audio_ctx} "
                                "(one 30 s window)")
        return self.encoder_stack(x + self.audio_positions[:x.shape[1]].to(x.dtype))

    def forward(self, mel: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Teacher forcing: logits [B, T, vocab] for every target position at once."""
        return self.decode(target_ids, self.memory_kv(self.encode(mel)))


# ---- the special-token prompt -----------------------------------------------------------------------------------

TASKS = ("transcribe", "translate")


def prompt_tokens(token_id: Callable[[str], int | None], language: str | None = "en", task: str = "transcribe",
                  timestamps: bool = False) -> list[int]:
    """<|startoftranscript|> <|language|> <|task|> [<|notimestamps|>] as ids; `token_id` maps a token to its id
    (a tokenizer's token_to_id). language None: leave it for the model to say (a monolingual `.en` model)."""
    if task not in TASKS:
        raise SparkGPTError(f"task {task!r} is not supported; expected one of {', '.join(TASKS)}")
    names = ["<|startoftranscript|>"]
    if language is not None:
        names.append(f"<|{language}|>")
    names.append(f"<|{task}|>")
    if not timestamps:
        names.append("<|notimestamps|>")
    ids = []
    for name in names:
        found = token_id(name)
        if found is None:
            what = f"language {language!r}" if name == f"<|{language}|>" else f"token {name}"
            raise SparkGPTError(f"this Whisper tokenizer has no {what}")
        ids.append(found)
    return ids


__all__ = ["WHISPER_FIXED", "Whisper", "WhisperConfig", "prompt_tokens", "sinusoids", "whisper_config"]
