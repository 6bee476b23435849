"""Speech to text with a Whisper LM: audio files or 16 kHz sample arrays in, one transcript each out.

Each input is cut into 30 s windows (`sparkgpt.data.audio.windows`), each window becomes Whisper's log-mel
features and is decoded after the special-token prompt (language, task, no timestamps) by
`sparkgpt.generate.whisper_decode`; a file's transcript is its windows' texts joined by spaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sparkgpt.data.audio import log_mel_spectrogram, pad_or_trim, read_audio, windows
from sparkgpt.errors import SparkGPTError
from sparkgpt.generate import whisper_decode
from sparkgpt.lm import LM
from sparkgpt.model.whisper import Whisper, prompt_tokens

Audio = str | Path | torch.Tensor | np.ndarray  # a file, or float samples [N] at 16 kHz, mono
DEFAULT_BEAM_SIZE = 5  # faster-whisper's default


def whisper_prompt(lm: LM, language: str | None = "en", task: str = "transcribe") -> list[int]:
    """The special-token prompt of `lm`'s Whisper for `language` (an unknown one is a one-line error)."""
    if not isinstance(lm.model, Whisper):
        raise SparkGPTError(f"transcribing needs a Whisper model (e.g. whisper-base); this one is "
                            f"{type(lm.model).__name__} ({lm.config.architecture!r})")
    return prompt_tokens(lm._require_tokenizer().token_to_id, language=language, task=task)


def samples(audio: Audio) -> torch.Tensor:
    """A file read as 16 kHz mono, or an array taken as such samples already."""
    if isinstance(audio, (str, Path)):
        return read_audio(audio)
    wave = torch.as_tensor(audio, dtype=torch.float32)
    if wave.dim() != 1 or wave.numel() == 0 or not bool(torch.isfinite(wave).all()):
        raise SparkGPTError(f"audio samples must be a non-empty 1-D array of finite numbers, got shape "
                            f"{list(wave.shape)}")
    return wave


def transcribe(lm: LM, audio: Audio | Sequence[Audio], language: str | None = "en",
               beam_size: int = DEFAULT_BEAM_SIZE, task: str = "transcribe") -> str | list[str]:
    """The transcript of one input (-> str) or of each of a list (-> list). An input is a file path (any format
    soundfile reads) or float samples at 16 kHz; language None lets the model name it; task "translate" gives
    English text."""
    single = isinstance(audio, (str, Path, torch.Tensor, np.ndarray))
    inputs = [audio] if single else list(audio)
    prompt = whisper_prompt(lm, language, task)
    model, tokenizer = lm.model, lm._require_tokenizer()
    device = model.lm_head.weight.device
    texts = []
    for item in inputs:
        waves = torch.stack([pad_or_trim(window) for window in windows(samples(item))])
        features = log_mel_spectrogram(waves.to(device), n_mels=model.config.n_mels)
        ids = whisper_decode(model, features, prompt, beam_size=beam_size)
        texts.append(" ".join(text for text in (tokenizer.decode(row).strip() for row in ids) if text))
    return texts[0] if single else texts
