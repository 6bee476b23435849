"""ModelConfig: the one description of a Transformer's shape, and the named presets (the model zoo is data)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from sparkgpt.errors import SparkGPTError

# Attention patterns a layer may have (defined in sparkgpt/model/sparse.py).
ATTENTION_PATTERNS = ("dense", "local", "strided", "fixed")


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
    positions: Literal["learned", "rope", "sinusoidal", "relative"] = "learned"
    rope_theta: float = 10000.0
    # A context extension of rope: {"rope_type": "linear" | "llama3" | "yarn" | "dynamic" | "longrope", "factor",
    # ...} as transformers writes it (model/attention.py `rope_frequencies`); None: plain rope.
    rope_scaling: dict[str, Any] | None = None
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    ffn: Literal["gelu", "swiglu", "geglu"] = "gelu"
    # Biases on every projection (GPT-2) or none (Llama).
    bias: bool = True
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02
    # Which attention implementation runs: "sdpa" (fused PyTorch kernels) or "eager" (the readable reference).
    # Not part of the architecture: it never changes the math, only the speed.
    attention_backend: Literal["sdpa", "eager"] = "sdpa"
    # ---- the rest of the Transformer family (defaults keep every decoder-only preset and checkpoint as it was) ----
    # "decoder": GPT (causal); "encoder": BERT (bidirectional, returns hidden states); "encoder-decoder": the
    # original Transformer (an encoder stack, and a decoder stack with masked self-attention and cross-attention).
    architecture: Literal["decoder", "encoder", "encoder-decoder"] = "decoder"
    n_encoder_layers: int | None = None  # encoder-decoder: layers of the encoder stack; None means n_layers
    # Where each block normalises: "pre" x + f(Norm(x)) (GPT-2, Llama) or "post" Norm(x + f(x)) (BERT, 2017 paper).
    norm_position: Literal["pre", "post"] = "pre"
    final_norm: bool = True          # a norm after the last block (pre-norm stacks; nn.Transformer always)
    embedding_norm: bool = False     # a norm right after the embeddings (BERT)
    type_vocab_size: int = 0         # token-type (segment) embeddings, BERT's sentence A/B; 0 means none
    scale_embeddings: bool = False   # multiply token embeddings by √d_model (the 2017 paper)
    qkv_bias: bool | None = None     # biases on the q/k/v projections; None means `bias` (GPT-Neo: False)
    attention_scale: float | None = None  # scores are Q·Kᵀ × this; None means 1/√d_k (GPT-Neo: 1.0)
    qk_norm: bool = False            # RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False      # also a norm on each sub-layer's output, before the residual add (Gemma 2/3)
    rope_local_theta: float | None = None  # the rope base of "local" layers, when it differs (Gemma 3: 10,000)
    # Soft-capping cap·tanh(x / cap) of the attention scores before the mask and softmax, and of the output logits
    # (Gemma 2: 50 and 30); None: no cap.
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # The attention pattern of each layer, cycled over the layers: ["dense", "local"] alternates as in GPT-3 and
    # GPT-Neo. None means dense causal everywhere. "local": the last `attention_window` positions; "strided"
    # and "fixed": the Sparse Transformer's patterns with stride / block `attention_window` (sparkgpt/model/sparse.py).
    attention_patterns: list[str] | None = None
    attention_window: int = 256
    fixed_summary: int = 1           # "fixed": the last `fixed_summary` positions of each block are seen by all later
    # Mixture of experts: n_experts > 0 replaces each FFN with n_experts FFNs and a router sending every token to
    # its experts_per_token best (Mixtral). expert_capacity_factor None is dropless; else each expert takes at most
    # ceil(factor × tokens × k / n_experts) tokens per batch (MixtureOfExperts, sparkgpt/model/layers.py).
    n_experts: int = 0
    experts_per_token: int = 2
    expert_capacity_factor: float | None = None
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss the trainer adds (model.aux_loss)
    pad_token_id: int | None = None
    # T5 ("relative" positions, encoder–decoder only): no position vectors; each stack adds to every score a learned
    # per-head bias of the key-minus-query distance, in `relative_buckets` buckets (exact near, logarithmic up to
    # `relative_max_distance`, model/attention.py `relative_position_buckets`).
    relative_buckets: int = 32
    relative_max_distance: int = 128
    scale_decoder_output: bool = False  # decoder output × d_model^-0.5 before the lm head (T5 with a tied head)
    decoder_start_token_id: int | None = None  # the token an encoder–decoder's target starts from (T5: pad, 0)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        if self.n_encoder_layers is None and self.architecture == "encoder-decoder":
            self.n_encoder_layers = self.n_layers
        if self.attention_patterns is not None:
            self.attention_patterns = list(self.attention_patterns)
        self.validate()

    def validate(self) -> None:
        choices = {
            "positions": ("learned", "rope", "sinusoidal", "relative"),
            "norm": ("layernorm", "rmsnorm"),
            "ffn": ("gelu", "gelu_exact", "relu", "quick_gelu", "swiglu", "geglu"),
            "attention_backend": ("sdpa", "eager"),
            "architecture": ("decoder", "encoder", "encoder-decoder"),
            "norm_position": ("pre", "post"),
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
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        if self.positions == "rope" and self.head_dim % 2:  # rotary turns q and k in pairs of dimensions
            raise SparkGPTError(f"config field 'head_dim' ({self.head_dim}) must be even for rope positions")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise SparkGPTError(f"config field 'd_model' ({self.d_model}) must be even for sinusoidal positions")
        self._validate_family()

    def _validate_family(self) -> None:
        patterns = self.attention_patterns
        if patterns is not None:
            if not isinstance(patterns, list) or not patterns or any(p not in ATTENTION_PATTERNS for p in patterns):
                raise SparkGPTError(f"config field 'attention_patterns' is {patterns!r}; expected a non-empty list "
                                    f"of {', '.join(ATTENTION_PATTERNS)}")
            if self.architecture != "decoder" and any(p != "dense" for p in patterns):
                raise SparkGPTError("config field 'attention_patterns': sparse patterns are causal; they need "
                                    f"architecture 'decoder', not {self.architecture!r}")
        counts = {"attention_window": self.attention_window, "fixed_summary": self.fixed_summary,
                  "experts_per_token": self.experts_per_token}
        if self.n_encoder_layers is not None:
            counts["n_encoder_layers"] = self.n_encoder_layers
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SparkGPTError(f"config field {name!r} is {value!r}; expected a positive integer")
        if self.fixed_summary > self.attention_window:
            raise SparkGPTError(f"config field 'fixed_summary' ({self.fixed_summary}) exceeds 'attention_window' "
                                f"({self.attention_window})")
        if not isinstance(self.n_experts, int) or self.n_experts < 0 or self.n_experts == 1:
            raise SparkGPTError(f"config field 'n_experts' is {self.n_experts!r}; expected 0 (no experts) or >= 2")
        if self.n_experts and self.experts_per_token > self.n_experts:
            raise SparkGPTError(f"config field 'experts_per_token' ({self.experts_per_token}) exceeds 'n_experts' "
                                f"({self.n_experts})")
        if self.expert_capacity_factor is not None and not self.expert_capacity_factor > 0:
            raise SparkGPTError(f"config field 'expert_capacity_factor' is {self.expert_capacity_factor!r}; "
                                "expected a positive number or None")
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise SparkGPTError(f"config field {name!r} is {value!r}; expected a positive number or None")
        if self.positions == "relative" and self.architecture != "encoder-decoder":
            raise SparkGPTError("config field 'positions': 'relative' (T5) needs architecture 'encoder-decoder', not "
                                f"{self.architecture!r}")
        # A bidirectional stack halves the buckets twice (a sign, then exact and logarithmic): at least one of each.
        for name in ("relative_buckets", "relative_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 4:
                raise SparkGPTError(f"config field {name!r} is {value!r}; expected an integer >= 4")
        if self.type_vocab_size < 0:
            raise SparkGPTError(f"config field 'type_vocab_size' is {self.type_vocab_size!r}; expected >= 0")

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        keys = {"linear": {"factor"}, "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor",
                                                 "high_freq_factor"},
                "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                         "truncate"},
                "dynamic": {"factor", "original_max_position_embeddings"},
                "longrope": {"factor", "original_max_position_embeddings", "short_factor", "long_factor",
                             "attention_factor"}}
        if not isinstance(scaling, dict) or scaling.get("rope_type") not in keys:
            raise SparkGPTError(f"config field 'rope_scaling' must be a mapping with rope_type one of "
                                f"{', '.join(keys)}; got {scaling!r}")
        kind = scaling["rope_type"]
        unknown = sorted(set(scaling) - keys[kind] - {"rope_type"})
        if unknown or scaling.get("truncate", True) is not True:  # DeepSeek's mscale variants: not these formulas
            raise SparkGPTError(f"config field 'rope_scaling': {kind} with "
                                f"{', '.join(unknown) or 'truncate=False'} is not supported")

        def number(value: Any) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float))

        factor = scaling.get("factor")
        if kind == "longrope":  # a factor ≤ 1 only means no attention scaling (transformers' rule)
            if not number(factor) or not factor > 0:
                raise SparkGPTError(f"config field 'rope_scaling.factor' must be a positive number for longrope, "
                                    f"got {factor!r}")
        elif not number(factor) or not factor >= 1:
            raise SparkGPTError(f"config field 'rope_scaling.factor' must be a number >= 1, got {factor!r}")
        original = scaling.get("original_max_position_embeddings")
        if kind != "linear" and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
            raise SparkGPTError("config field 'rope_scaling.original_max_position_embeddings' must be a positive "
                                f"integer for {kind}, got {original!r}")
        attention_factor = scaling.get("attention_factor")
        if attention_factor is not None and (not number(attention_factor) or not attention_factor > 0):
            raise SparkGPTError("config field 'rope_scaling.attention_factor' must be a positive number, got "
                                f"{attention_factor!r}")
        if kind == "longrope":  # one rescaling of each pair's wavelength, for contexts within / past the original
            for name in ("short_factor", "long_factor"):
                values = scaling.get(name)
                if not isinstance(values, list) or len(values) != self.head_dim // 2 or not all(
                        number(v) and v > 0 for v in values):
                    raise SparkGPTError(f"config field 'rope_scaling.{name}' must be a list of {self.head_dim // 2} "
                                        f"positive numbers (head_dim / 2), got {values!r}")

    def layer_patterns(self) -> list[str]:
        """The attention pattern of each decoder layer ("dense" unless attention_patterns says otherwise)."""
        patterns = self.attention_patterns or ["dense"]
        return [patterns[i % len(patterns)] for i in range(self.n_layers)]

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
        norm_params = d * (2 if self.norm == "layernorm" and self.bias else 1)
        q_out, kv_out = self.n_heads * hd, self.n_kv_heads * hd
        qkv_bias = self.bias if self.qkv_bias is None else self.qkv_bias
        self_attention = d * (q_out + 2 * kv_out) + q_out * d + (q_out + 2 * kv_out) * qkv_bias + d * self.bias
        cross_attention = self_attention + norm_params if self.architecture == "encoder-decoder" else 0
        gated = self.ffn in ("swiglu", "geglu")
        ffn = d * self.d_ff * (3 if gated else 2)
        if self.bias:
            ffn += self.d_ff * (2 if gated else 1) + d
        if self.n_experts:
            ffn = self.n_experts * ffn + d * self.n_experts  # the experts and the router
        block = self_attention + ffn + 2 * norm_params
        embeddings = self.vocab_size * d + (self.max_seq_len * d if self.positions == "learned" else 0)
        embeddings += self.type_vocab_size * d + (norm_params if self.embedding_norm else 0)
        if self.positions == "relative":  # one bias table per stack
            embeddings += 2 * self.relative_buckets * self.n_heads
        final = norm_params if self.final_norm else 0
        if self.architecture == "encoder":
            return embeddings + self.n_layers * block + final
        head = 0 if self.tie_embeddings else self.vocab_size * d
        encoder = self.n_encoder_layers * block + final if self.architecture == "encoder-decoder" else 0
        return embeddings + encoder + self.n_layers * (block + cross_attention) + final + head


_GPT2 = dict(vocab_size=50257, max_seq_len=1024, positions="learned", norm="layernorm", ffn="gelu", bias=True,
             tie_embeddings=True, bos_token_id=50256, eos_token_id=50256)
_SMOLLM2 = dict(vocab_size=49152, positions="rope", norm="rmsnorm", ffn="swiglu", bias=False,
                tie_embeddings=True, bos_token_id=1, eos_token_id=2)
_TRAINABLE = dict(positions="rope", norm="rmsnorm", ffn="swiglu", bias=False, tie_embeddings=True, rope_theta=10000.0,
                  bos_token_id=None, eos_token_id=None)

_BERT = dict(architecture="encoder", positions="learned", norm="layernorm", norm_eps=1e-12, ffn="gelu_exact",
             bias=True, norm_position="post", final_norm=False, embedding_norm=True, type_vocab_size=2,
             tie_embeddings=False, pad_token_id=0)
_SEQ2SEQ = dict(architecture="encoder-decoder", positions="sinusoidal", norm="layernorm", ffn="relu", bias=True,
                norm_position="post", scale_embeddings=True, tie_embeddings=True, bos_token_id=1, eos_token_id=0,
                pad_token_id=2)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, n_layers=12, n_heads=12, d_model=768),
    "gpt2-medium": dict(_GPT2, n_layers=24, n_heads=16, d_model=1024),
    "gpt2-large": dict(_GPT2, n_layers=36, n_heads=20, d_model=1280),
    "gpt2-xl": dict(_GPT2, n_layers=48, n_heads=25, d_model=1600),
    "smollm2-135m": dict(_SMOLLM2, n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_ff=1536,
                         max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5),
    "smollm2-360m": dict(_SMOLLM2, n_layers=32, n_heads=15, n_kv_heads=5, d_model=960, d_ff=2560,
                         max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5),
    # Llama-2-7B's shape (for `sparkgpt plan` and clusters): 32 layers of 4096, SwiGLU 11008, untied, 32k vocabulary.
    "llama-7b": dict(_SMOLLM2, vocab_size=32000, n_layers=32, n_heads=32, d_model=4096, d_ff=11008, max_seq_len=4096,
                     rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, bos_token_id=1, eos_token_id=2),
    # Tiny shapes of each family, for tests and quick experiments.
    "tiny-gpt2": dict(_GPT2, vocab_size=512, n_layers=2, n_heads=4, d_model=64, max_seq_len=128,
                      bos_token_id=None, eos_token_id=None),
    "tiny-llama": dict(_SMOLLM2, vocab_size=512, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=176,
                       max_seq_len=256, rope_theta=50000.0, tie_embeddings=False,
                       bos_token_id=None, eos_token_id=None),
    # Models to train from scratch (`sparkgpt train`; training presets of the same names in sparkgpt/train/config.py).
    # Llama-style blocks (RoPE, RMSNorm, SwiGLU: transformers loads them as LlamaForCausalLM); the prepared data
    # sets vocab_size. nanoGPT's Shakespeare shapes, then a GPT-2-small-sized model for GPUs.
    "shakespeare-char": dict(_TRAINABLE, vocab_size=96, n_layers=4, n_heads=4, d_model=128, d_ff=352, max_seq_len=256),
    "shakespeare-baby": dict(_TRAINABLE, vocab_size=96, n_layers=6, n_heads=6, d_model=384, d_ff=1024,
                             max_seq_len=256),
    "sparkgpt-124m": dict(_TRAINABLE, vocab_size=50304, n_layers=12, n_heads=12, d_model=768, d_ff=2048,
                          max_seq_len=1024),
    # The rest of the Transformer family. Tiny shapes for tests, then models `sparkgpt train` runs on a CPU.
    "tiny-bert": dict(_BERT, vocab_size=512, n_layers=2, n_heads=4, d_model=64, d_ff=128, max_seq_len=128),
    "tiny-seq2seq": dict(_SEQ2SEQ, vocab_size=64, n_layers=2, n_encoder_layers=2, n_heads=4, d_model=64, d_ff=128,
                         max_seq_len=64),
    "tiny-sparse": dict(_GPT2, vocab_size=512, n_layers=4, n_heads=4, d_model=64, max_seq_len=256,
                        bos_token_id=None, eos_token_id=None, attention_patterns=["dense", "local"],
                        attention_window=16),
    "tiny-moe": dict(_SMOLLM2, vocab_size=512, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=96,
                     max_seq_len=256, tie_embeddings=False, bos_token_id=None, eos_token_id=None, n_experts=4,
                     experts_per_token=2),
    # The 2017 Transformer's recipe, pre-norm (it trains without warmup tricks), for seq2seq JSONL on a CPU.
    "seq2seq-small": dict(_SEQ2SEQ, vocab_size=128, n_layers=3, n_encoder_layers=3, n_heads=4, d_model=128,
                          d_ff=512, max_seq_len=256, norm_position="pre"),
    # shakespeare-char's shape with GPT-3/GPT-Neo alternating dense and local (window 64) layers, block 256.
    "shakespeare-sparse": dict(_TRAINABLE, vocab_size=96, n_layers=4, n_heads=4, d_model=128, d_ff=352,
                               max_seq_len=256, attention_patterns=["dense", "local"], attention_window=64),
    # shakespeare-char's shape with a Mixtral-style FFN: 4 experts of the full d_ff, top-2 routing (twice the FFN
    # compute per token of the dense model, 4× its FFN weights).
    "shakespeare-moe": dict(_TRAINABLE, vocab_size=96, n_layers=4, n_heads=4, d_model=128, d_ff=352,
                            max_seq_len=256, n_experts=4, experts_per_token=2),
    # An image question answerer (sparkgpt.model.vision.ImageText: transformers' VisionEncoderDecoderModel with a
    # ViT encoder and a GPT-2 decoder): 64 × 64 images in 8 × 8 patches, four ViT blocks, two decoder blocks.
    "easy-vqa": dict(_GPT2, vocab_size=512, n_layers=2, n_encoder_layers=4, n_heads=4, d_model=128, d_ff=512,
                     max_seq_len=64, architecture="encoder-decoder", image_size=64, patch_size=8, num_channels=3),
}


def check_image_fields(config: Any) -> None:
    """The image front end's fields (image_size, patch_size, num_channels) of a vision or image-to-text config."""
    for name in ("image_size", "patch_size", "num_channels"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SparkGPTError(f"config field {name!r} is {value!r}; expected a positive integer")
    if config.patch_size > config.image_size:
        raise SparkGPTError(f"config field 'patch_size' ({config.patch_size}) exceeds 'image_size' "
                            f"({config.image_size})")


@dataclass
class ImageTextConfig(ModelConfig):
    """An image-to-text model's config (`sparkgpt.model.vision.ImageText`): an encoder–decoder's (the decoder's
    shape; `n_encoder_layers` ViT blocks of the same width) with the image front end of a ViT."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3

    def validate(self) -> None:
        check_image_fields(self)
        super().validate()
        if self.architecture != "encoder-decoder" or self.positions == "relative":
            raise SparkGPTError("an image-to-text config needs architecture 'encoder-decoder' with token positions "
                                f"(not relative), not {self.architecture!r} with {self.positions!r}")

    def replace(self, **changes: Any) -> ImageTextConfig:
        return ImageTextConfig.from_dict({**self.to_dict(), **changes})

    def num_parameters(self) -> int:
        """The encoder–decoder's count plus the patch embedding's (convolution, class token, positions)."""
        patches = (self.image_size // self.patch_size) ** 2
        patch_embedding = (self.num_channels * self.patch_size ** 2 + 1) * self.d_model + (patches + 2) * self.d_model
        return super().num_parameters() + patch_embedding


IMAGE_FIELDS = tuple(f.name for f in dataclasses.fields(ImageTextConfig) if f.name not in
                     {g.name for g in dataclasses.fields(ModelConfig)})


def is_image_text(name: str) -> bool:
    """Whether a model preset is an image-to-text model (it has an image front end)."""
    return any(field in PRESETS.get(name, {}) for field in IMAGE_FIELDS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with some fields changed: ``preset("gpt2", n_layers=6)``; an ImageTextConfig for a
    preset with an image front end."""
    if name not in PRESETS:
        raise SparkGPTError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    config_type = ImageTextConfig if is_image_text(name) else ModelConfig
    return config_type.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")


__all__ = ["IMAGE_FIELDS", "PRESETS", "ImageTextConfig", "ModelConfig", "check_image_fields", "is_image_text",
           "preset"]
