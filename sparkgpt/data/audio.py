"""Audio in: files read with soundfile, resampled to 16 kHz mono, and Whisper's log-mel spectrogram.

The spectrogram is Whisper's (and transformers' `WhisperFeatureExtractor`'s): 30 s windows of 480,000 samples,
a 400-point periodic-Hann STFT every 160 samples (centred, reflect-padded), power |X|², Slaney-style mel filters,
then

    L = log10(max(mel, 1e-10)),  L = max(L, max(L) - 8),  features = (L + 4) / 4

over 3,000 frames (the STFT's last frame dropped). Everything is torch, so it runs where the model runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch.nn import functional as F

from sparkgpt.errors import SparkGPTError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # one window of the encoder
N_FRAMES = N_SAMPLES // HOP_LENGTH
MAX_SECONDS = 4 * 3600  # longer files are refused before anything is decoded (a hostile header can claim any length)


# ---- files ---------------------------------------------------------------------------------------------------

def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS) -> torch.Tensor:
    """A file's samples as float32 mono [N] at `sample_rate` (channels averaged). Any format libsndfile reads
    (WAV, FLAC, OGG, MP3, ...); a missing, corrupt, empty or too-long file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise SparkGPTError(f"{path}: no such audio file")
    try:
        info = soundfile.info(str(path))
        if info.samplerate <= 0 or info.channels <= 0:
            raise SparkGPTError(f"{path}: unreadable header (sample rate {info.samplerate}, "
                                f"{info.channels} channels)")
        if info.frames > max_seconds * info.samplerate:
            raise SparkGPTError(f"{path}: {info.frames / info.samplerate:.0f} s of audio exceeds the "
                                f"{max_seconds:.0f} s limit")
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SparkGPTError(f"{path}: not a readable audio file ({reason})") from None
    if samples.shape[0] == 0:
        raise SparkGPTError(f"{path}: holds no audio samples")
    if not np.isfinite(samples).all():
        raise SparkGPTError(f"{path}: holds samples that are not finite numbers")
    mono = torch.from_numpy(samples.mean(axis=1))
    return resample(mono, rate, sample_rate)


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int, zero_crossings: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """[..., N] samples from `orig_rate` to `new_rate` by band-limited (windowed-sinc) interpolation.

    With the rates reduced to o : n by their gcd, output sample j of each group of n reads the input through its
    own filter: a sinc cut at rolloff · min(o, n) / 2 cycles per input group, Hann-windowed over `zero_crossings`
    lobes each side. All n filters run as one strided convolution."""
    if orig_rate == new_rate:
        return wave
    if orig_rate <= 0 or new_rate <= 0:
        raise SparkGPTError(f"sample rates must be positive, got {orig_rate} and {new_rate}")
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    cutoff = min(orig, new) * rolloff  # in cycles per group of `orig` input samples (times 2)
    width = math.ceil(zero_crossings * orig / cutoff)  # input samples each side a filter reaches
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    phases = -torch.arange(new, dtype=torch.float64)[:, None] / new
    t = ((taps[None, :] + phases) * cutoff).clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t * math.pi) / (t * math.pi))
    kernels = (sinc * window * cutoff / orig).to(wave.dtype)  # [new, taps]
    shape, length = wave.shape[:-1], wave.shape[-1]
    padded = F.pad(wave.reshape(-1, 1, length), (width, width + orig))
    out = F.conv1d(padded, kernels[:, None, :], stride=orig)  # [B, new, groups]
    out = out.transpose(1, 2).reshape(*shape, -1)
    return out[..., :math.ceil(new * length / orig)]


# ---- features ------------------------------------------------------------------------------------------------

def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    log_step = math.log(6.4) / 27.0
    return torch.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) / log_step)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    log_step = math.log(6.4) / 27.0
    return torch.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * torch.exp(log_step * (mel - 15.0)))


def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """[n_mels, n_fft / 2 + 1] triangular filters, evenly spaced on the mel scale from 0 Hz to Nyquist, each
    scaled by 2 / its width in Hz (Slaney's equal-area norm: librosa's and Whisper's filters)."""
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = _mel_to_hz(torch.linspace(0.0, float(_hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2,
                                      dtype=torch.float64))
    widths = edges[1:] - edges[:-1]
    slopes = edges[:, None] - fft_hz[None, :]  # [n_mels + 2, bins]
    rising = -slopes[:-2] / widths[:-1, None]
    falling = slopes[2:] / widths[1:, None]
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return (filters * (2.0 / (edges[2:] - edges[:-2]))[:, None]).float()


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """[..., N] -> [..., length]: zeros appended, or the end cut (one encoder window)."""
    if audio.shape[-1] >= length:
        return audio[..., :length]
    return F.pad(audio, (0, length - audio.shape[-1]))


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """16 kHz samples [N] or [B, N] -> Whisper's features [B, n_mels, 3000] of one 30 s window (padded or cut)."""
    audio = pad_or_trim(audio.float().reshape(-1, audio.shape[-1]))
    window = torch.hann_window(N_FFT, device=audio.device)
    spectrum = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                          return_complex=True)
    power = spectrum[..., :-1].abs() ** 2  # [B, bins, 3000]
    mel = mel_filters(n_mels).to(audio.device) @ power
    log = mel.clamp(min=1e-10).log10()
    log = torch.maximum(log, log.amax(dim=(-2, -1), keepdim=True) - 8.0)  # an 80 dB floor below each window's peak
    return (log + 4.0) / 4.0


def windows(audio: torch.Tensor, seconds: int = CHUNK_SECONDS) -> list[torch.Tensor]:
    """Long audio [N] as consecutive windows of `seconds` (the last one shorter), each for one encoder pass."""
    step = seconds * SAMPLE_RATE
    return [audio[start:start + step] for start in range(0, max(audio.shape[-1], 1), step)]
