"""ModelConfig: the one description of a Transformer's shape, and the named presets (the model zoo is data)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from sparkgpt.errors import SparkGPTError


@dataclass
class ModelConfig:
    """Everything the model needs to build itself; nothing about devices, files or training.

    The defaults are GPT-2 small. A Llama-family model sets ``positions="rope"``, ``norm="rmsnorm"``,
    ``ffn="swiglu"``, ``bias=False`` and usually ``n_kv_heads < n_heads`` (grouped-query attention).
    """

    vocab_size: int = 50257
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    # Fewer key/value heads than query heads is grouped-query attention; None means one per query head.
    n_kv_heads: int | None = None
    # Width of the feed-forward hidden layer; None means 4 * d_model (GPT-2's choice).
    d_ff: int | None = None
    # Width of one attention head; None means d_model // n_heads.
    head_dim: int | None = None
    max_seq_len: int = 1024
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    ffn: Literal["gelu", "swiglu"] = "gelu"
    # Biases on every projection (GPT-2) or none (Llama).
    bias: bool = True
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02
    # Which attention implementation runs: "sdpa" (fused PyTorch kernels) or "eager" (the readable reference).
    # Not part of the architecture: it never changes the math, only the speed.
    attention_backend: Literal["sdpa", "eager"] = "sdpa"
    # Where later work plugs in, per layer: the attention pattern (dense causal today; sparse patterns later)
    # and the feed-forward variant (dense today; mixture of experts later) are chosen in Block from this config.

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        self.validate()

    def validate(self) -> None:
        choices = {
            "positions": ("learned", "rope"),
            "norm": ("layernorm", "rmsnorm"),
            "ffn": ("gelu", "swiglu"),
            "attention_backend": ("sdpa", "eager"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SparkGPTError(f"config field {name!r} is {getattr(self, name)!r}; expected one of {allowed}")
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "n_kv_heads", "d_ff", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SparkGPTError(f"config field {name!r} is {value!r}; expected a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise SparkGPTError(
                f"config field 'n_kv_heads' ({self.n_kv_heads}) must divide 'n_heads' ({self.n_heads})"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise SparkGPTError(f"config field 'head_dim' ({self.head_dim}) must be even for rotary positions")

    @property
    def kv_group_size(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SparkGPTError(
                f"{source}: unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def num_parameters(self) -> int:
        """Parameter count computed from the shape alone (tied embeddings counted once)."""
        d, hd = self.d_model, self.head_dim
        norm_params = d * (2 if self.norm == "layernorm" else 1)
        q_out, kv_out = self.n_heads * hd, self.n_kv_heads * hd
        attention = d * (q_out + 2 * kv_out) + q_out * d
        ffn = d * self.d_ff * (3 if self.ffn == "swiglu" else 2)
        if self.bias:
            attention += q_out + 2 * kv_out + d
            ffn += self.d_ff * (2 if self.ffn == "swiglu" else 1) + d
        block = attention + ffn + 2 * norm_params
        embeddings = self.vocab_size * d + (self.max_seq_len * d if self.positions == "learned" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embeddings + self.n_layers * block + norm_params + head


_GPT2 = dict(vocab_size=50257, max_seq_len=1024, positions="learned", norm="layernorm", ffn="gelu", bias=True,
             tie_embeddings=True, bos_token_id=50256, eos_token_id=50256)
_SMOLLM2 = dict(vocab_size=49152, positions="rope", norm="rmsnorm", ffn="swiglu", bias=False,
                tie_embeddings=True, bos_token_id=1, eos_token_id=2)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, n_layers=12, n_heads=12, d_model=768),
    "gpt2-medium": dict(_GPT2, n_layers=24, n_heads=16, d_model=1024),
    "gpt2-large": dict(_GPT2, n_layers=36, n_heads=20, d_model=1280),
    "gpt2-xl": dict(_GPT2, n_layers=48, n_heads=25, d_model=1600),
    "smollm2-135m": dict(_SMOLLM2, n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_ff=1536,
                         max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5),
    "smollm2-360m": dict(_SMOLLM2, n_layers=32, n_heads=15, n_kv_heads=5, d_model=960, d_ff=2560,
                         max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5),
    # Tiny shapes of each family, for tests and quick experiments.
    "tiny-gpt2": dict(_GPT2, vocab_size=512, n_layers=2, n_heads=4, d_model=64, max_seq_len=128,
                      bos_token_id=None, eos_token_id=None),
    "tiny-llama": dict(_SMOLLM2, vocab_size=512, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=176,
                       max_seq_len=256, rope_theta=50000.0, tie_embeddings=False,
                       bos_token_id=None, eos_token_id=None),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with some fields changed: ``preset("gpt2", n_layers=6)``."""
    if name not in PRESETS:
        raise SparkGPTError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")


__all__ = ["PRESETS", "ModelConfig", "preset"]
