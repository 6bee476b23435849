"""The transformers model families sparkgpt reads and writes: for each, one table of tensor names (ours ->
theirs) and two small config translations. Adding a family means adding its table here, not a model class."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.model.attention import ROPE_SCALING

# Keys every transformers config.json may carry that say nothing about the architecture's math.
GENERIC_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
    "pad_token_id", "id2label", "label2id", "problem_type", "return_dict", "output_hidden_states",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "task_specific_params",
    "_attn_implementation_autoset", "torchscript", "tie_encoder_decoder", "prefix", "sep_token_id",
    "decoder_start_token_id", "finetuning_task", "add_cross_attention", "cross_attention_hidden_size",
    "quantization_config",  # checked by sparkgpt.checkpoint.quantized (ours loads; any other method is refused there)
}


@dataclasses.dataclass(frozen=True)
class Family:
    """How one transformers model family spells our ModelConfig and tensor names."""

    model_type: str
    architecture: str
    config_from_hf: Callable[[dict[str, Any], str], dict[str, Any]]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]] | None  # None: read only (`family_for` never names it)
    tensor_names: Callable[[ModelConfig], dict[str, str]]  # our name -> their name
    to_ours: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]] | None = None
    to_theirs: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]] | None = None
    ignored_tensors: tuple[str, ...] = ()  # suffixes of buffers older checkpoints saved (masks, inv_freq)
    base_prefix: str = "model."  # what a task model (…ForCausalLM) puts before the base model's tensor names


def _take(hf: dict[str, Any], source: str, known: set[str]) -> None:
    unknown = sorted(set(hf) - known - GENERIC_KEYS)
    if unknown:
        raise SparkGPTError(f"{source}: unknown config field(s) {', '.join(unknown)}")


def _require(source: str, field: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise SparkGPTError(f"{source}: field {field!r} is {value!r}; supported: {', '.join(map(repr, allowed))}")


# ---- GPT-2 ---------------------------------------------------------------------------------------------------

_GPT2_KEYS = {
    "vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "scale_attn_weights", "bos_token_id", "eos_token_id", "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn", "tie_word_embeddings",
}


def _gpt2_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    _take(hf, source, _GPT2_KEYS)
    _require(source, "activation_function", hf.get("activation_function", "gelu_new"),
             ("gelu_new", "gelu_pytorch_tanh"))
    _require(source, "scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False), (False,))
    _require(source, "scale_attn_weights", hf.get("scale_attn_weights", True), (True,))
    return dict(
        vocab_size=hf.get("vocab_size", 50257), n_layers=hf.get("n_layer", 12), n_heads=hf.get("n_head", 12),
        d_model=hf.get("n_embd", 768), d_ff=hf.get("n_inner"), max_seq_len=hf.get("n_positions", 1024),
        positions="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), ffn="gelu",
        bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), initializer_range=hf.get("initializer_range", 0.02),
    )


def _gpt2_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.d_ff, activation_function="gelu_new",
        layer_norm_epsilon=config.norm_eps, initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


# GPT-2 and GPT-Neo name their embeddings and final norm alike.
_GPT2_OUTER_TENSORS = {
    "token_embedding.weight": "transformer.wte.weight",
    "position_embedding.weight": "transformer.wpe.weight",
    "final_norm.weight": "transformer.ln_f.weight",
    "final_norm.bias": "transformer.ln_f.bias",
}


def _gpt2_tensor_names(config: ModelConfig) -> dict[str, str]:
    names = dict(_GPT2_OUTER_TENSORS)
    for i in range(config.n_layers):
        for ours, theirs in (("attn_norm", "ln_1"), ("attn.o_proj", "attn.c_proj"), ("ffn_norm", "ln_2"),
                             ("ffn.up_proj", "mlp.c_fc"), ("ffn.down_proj", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"transformer.h.{i}.{theirs}.{kind}"
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _gpt2_to_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 stores projections as Conv1D, weight [in, out] (transposed), with Q, K, V fused in `c_attn`."""
    ours = {}
    for i in range(config.n_layers):
        fused_weight = state.pop(f"transformer.h.{i}.attn.c_attn.weight").t()
        fused_bias = state.pop(f"transformer.h.{i}.attn.c_attn.bias")
        projections = zip(("q_proj", "k_proj", "v_proj"), fused_weight.chunk(3), fused_bias.chunk(3), strict=True)
        for name, weight, bias in projections:
            ours[f"blocks.{i}.attn.{name}.weight"] = weight
            ours[f"blocks.{i}.attn.{name}.bias"] = bias
        for conv in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            key = f"transformer.h.{i}.{conv}.weight"
            state[key] = state[key].t()
    return ours


def _gpt2_to_theirs(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    theirs = {}
    for i in range(config.n_layers):
        prefix = f"blocks.{i}.attn."
        theirs[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
            [state.pop(prefix + f"{n}.weight") for n in ("q_proj", "k_proj", "v_proj")]).t()
        theirs[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
            [state.pop(prefix + f"{n}.bias") for n in ("q_proj", "k_proj", "v_proj")])
        for ours in ("attn.o_proj", "ffn.up_proj", "ffn.down_proj"):
            key = f"blocks.{i}.{ours}.weight"
            state[key] = state[key].t()
    return theirs


# ---- Llama (SmolLM2, Llama 2/3, Mistral-shaped dense models) ----------------------------------------------

_LLAMA_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "bos_token_id", "eos_token_id", "pretraining_tp", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias",
}


def _llama_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    _take(hf, source, _LLAMA_KEYS)
    _require(source, "hidden_act", hf.get("hidden_act", "silu"), ("silu",))
    _require(source, "pretraining_tp", hf.get("pretraining_tp", 1), (1,))
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(source, "rope_type", rope_type, ("default", *ROPE_SCALING))
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise SparkGPTError(f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported")
    n_heads = hf.get("num_attention_heads", 32)
    scaling = _rope_scaling(rope, rope_type, hf, source)
    return dict(
        vocab_size=hf.get("vocab_size", 32000), n_layers=hf.get("num_hidden_layers", 32), n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_model=hf.get("hidden_size", 4096),
        d_ff=hf.get("intermediate_size", 11008), head_dim=hf.get("head_dim"),
        max_seq_len=_context(hf.get("max_position_embeddings", 2048), scaling), positions="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), ffn="swiglu", bias=attention_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), initializer_range=hf.get("initializer_range", 0.02),
        rope_scaling=scaling,
    )


# The keys transformers requires of each rope scaling (it fills original_max_position_embeddings in itself).
_ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                  "yarn": ("factor",), "dynamic": ("factor",), "longrope": ("short_factor", "long_factor")}


def _rope_scaling(rope: dict[str, Any], rope_type: str, hf: dict[str, Any], source: str) -> dict[str, Any] | None:
    """transformers' rope_parameters (5.x) or rope_scaling (4.x) as ours: the scaling's own keys, without theta."""
    if rope_type == "default":
        return None
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type", "rope_type") and v is not None}
    missing = [key for key in _ROPE_REQUIRED[rope_type] if key not in scaling]
    if missing:
        raise SparkGPTError(f"{source}: rope_type {rope_type!r} needs {', '.join(missing)} in its rope parameters")
    context = hf.get("max_position_embeddings", 2048)
    if rope_type == "dynamic":  # transformers grows the base past max_position_embeddings, whatever the scaling says
        scaling["original_max_position_embeddings"] = context
    elif rope_type != "linear":  # transformers falls back to the config's context when the scaling omits it
        scaling.setdefault("original_max_position_embeddings", context)
    if rope_type == "longrope":  # no factor: transformers takes the ratio of the two contexts (Phi-3)
        scaling.setdefault("factor", context / scaling["original_max_position_embeddings"])
    return {"rope_type": rope_type, **scaling}


def _context(max_position_embeddings: int, scaling: dict[str, Any] | None) -> int:
    """Our max_seq_len: transformers' max_position_embeddings, except under dynamic NTK, where that is the original
    context the rope base grows past, and ours is the factor times longer context the scaling is for."""
    if scaling is not None and scaling["rope_type"] == "dynamic":
        return math.ceil(max_position_embeddings * scaling["factor"])
    return max_position_embeddings


def _hf_rope(config: ModelConfig) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
    """max_position_embeddings, rope_scaling (4.x) and rope_parameters (5.x) as transformers reads them: under
    dynamic NTK, max_position_embeddings is the original context (`_context`)."""
    context, scaling = config.max_seq_len, config.rope_scaling
    if scaling is not None and scaling["rope_type"] == "dynamic":
        context = scaling["original_max_position_embeddings"]
        scaling = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    return context, scaling, {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta}


def _llama_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    context, scaling, rope_parameters = _hf_rope(config)
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=context, initializer_range=config.initializer_range,
        rms_norm_eps=config.norm_eps, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_embeddings, attention_bias=config.bias, mlp_bias=config.bias,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        rope_theta=config.rope_theta, rope_scaling=scaling, rope_parameters=rope_parameters,
    )


def llama_tensor_names(config: ModelConfig) -> dict[str, str]:
    names = {"token_embedding.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    kinds = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layers):
        layer = f"model.layers.{i}."
        names[f"blocks.{i}.attn_norm.weight"] = layer + "input_layernorm.weight"
        names[f"blocks.{i}.ffn_norm.weight"] = layer + "post_attention_layernorm.weight"
        for kind in kinds:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                names[f"blocks.{i}.attn.{proj}.{kind}"] = f"{layer}self_attn.{proj}.{kind}"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names[f"blocks.{i}.ffn.{proj}.{kind}"] = f"{layer}mlp.{proj}.{kind}"
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


# ---- Mistral (Llama with a sliding window) and Qwen2 (Llama with q/k/v biases) ---------------------------------

_MISTRAL_KEYS = _LLAMA_KEYS | {"sliding_window"}


def _mistral_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    _take(hf, source, _MISTRAL_KEYS)
    values = _llama_config_from_hf({k: v for k, v in hf.items() if k != "sliding_window"}, source)
    if hf.get("sliding_window") is not None:  # every layer sees the last `sliding_window` positions
        values.update(attention_patterns=["local"], attention_window=hf["sliding_window"])
    return values


def _mistral_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    values = {k: v for k, v in _llama_config_to_hf(config).items() if k not in ("attention_bias", "mlp_bias")}
    return dict(values, sliding_window=config.attention_window if config.layer_patterns()[0] == "local" else None)


_QWEN2_KEYS = _LLAMA_KEYS | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
_QWEN2_LAYERS = {"full_attention": "dense", "sliding_attention": "local"}


def _qwen2_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    _take(hf, source, _QWEN2_KEYS)
    return _with_layer_types(_llama_config_from_hf({k: v for k, v in hf.items() if k in _LLAMA_KEYS}, source), hf,
                             source) | dict(bias=False, qkv_bias=True)  # the output and MLP projections have none


def _qwen3_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Qwen3: Qwen2 without the q/k/v biases (unless attention_bias), with an RMSNorm on each head's q and k."""
    _take(hf, source, _QWEN2_KEYS)
    values = _llama_config_from_hf({k: v for k, v in hf.items() if k in _LLAMA_KEYS}, source)
    return _with_layer_types(values, hf, source) | dict(qk_norm=True)


def _with_layer_types(values: dict[str, Any], hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Qwen's per-layer attention: `layer_types`, or (older configs) sliding windows from `max_window_layers` on."""
    n_layers = values["n_layers"]
    window_from = hf.get("max_window_layers", n_layers) if hf.get("use_sliding_window") else n_layers
    layer_types = hf.get("layer_types") or ["sliding_attention" if i >= window_from else "full_attention"
                                            for i in range(n_layers)]
    for kind in layer_types:
        _require(source, "layer_types", kind, tuple(_QWEN2_LAYERS))
    if "sliding_attention" in layer_types:
        values.update(attention_patterns=[_QWEN2_LAYERS[kind] for kind in layer_types],
                      attention_window=hf.get("sliding_window") or 4096)
    return values


def _qwen2_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    values = {k: v for k, v in _llama_config_to_hf(config).items() if k not in ("attention_bias", "mlp_bias")}
    patterns = config.layer_patterns()
    layer_types = ["sliding_attention" if p == "local" else "full_attention" for p in patterns]
    sliding = "local" in patterns
    return dict(values, layer_types=layer_types, use_sliding_window=sliding,
                sliding_window=config.attention_window if sliding else None,
                max_window_layers=patterns.index("local") if sliding else config.n_layers)


def _qwen3_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(_qwen2_config_to_hf(config), attention_bias=config.bias)


def _qwen_tensor_names(config: ModelConfig) -> dict[str, str]:
    """Llama's names, with q/k/v biases (Qwen2) and per-head q/k norms (Qwen3) where the config has them."""
    names = llama_tensor_names(config)
    for i in range(config.n_layers):
        attention = f"model.layers.{i}.self_attn."
        if config.qkv_bias and not config.bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                names[f"blocks.{i}.attn.{proj}.bias"] = f"{attention}{proj}.bias"
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                names[f"blocks.{i}.attn.{norm}.weight"] = f"{attention}{norm}.weight"
    return names


# ---- Phi-3 (Llama's math with fused q/k/v and gate/up matrices) -------------------------------------------------

_PHI3_KEYS = _LLAMA_KEYS | {"resid_pdrop", "embd_pdrop", "original_max_position_embeddings", "sliding_window",
                            "partial_rotary_factor"}


def _phi3_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    _take(hf, source, _PHI3_KEYS)
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    _require(source, "partial_rotary_factor", rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)),
             (1, 1.0))
    if rope.get("rope_type", rope.get("type")) in ("su", "yarn", "longrope"):
        # transformers reads Phi-3's older "su" and "yarn" as longrope, with the top-level original context first
        rope = {k: v for k, v in rope.items() if k != "type"} | {"rope_type": "longrope"}
        rope["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", 4096)
    values = _llama_config_from_hf({k: v for k, v in hf.items() if k in _LLAMA_KEYS - {"rope_scaling"}} | {
        "rope_parameters": rope}, source)
    if hf.get("sliding_window") is not None:
        values.update(attention_patterns=["local"], attention_window=hf["sliding_window"])
    return values


def _phi3_tensor_names(config: ModelConfig) -> dict[str, str]:
    fused = (".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj.")
    return {ours: theirs for ours, theirs in llama_tensor_names(config).items() if not any(f in ours for f in fused)}


def _phi3_to_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Phi-3 stores [W_q; W_k; W_v] as qkv_proj and [W_gate; W_up] as gate_up_proj: split them."""
    ours, q_rows, kv_rows = {}, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    for i in range(config.n_layers):
        layer = f"model.layers.{i}."
        q, k, v = state.pop(layer + "self_attn.qkv_proj.weight").split([q_rows, kv_rows, kv_rows])
        gate, up = state.pop(layer + "mlp.gate_up_proj.weight").chunk(2)
        for name, weight in (("attn.q_proj", q), ("attn.k_proj", k), ("attn.v_proj", v), ("ffn.gate_proj", gate),
                             ("ffn.up_proj", up)):
            ours[f"blocks.{i}.{name}.weight"] = weight
    return ours


# ---- Gemma 2 and Gemma 3 (text) ------------------------------------------------------------------------------

_GEMMA_KEYS = (_LLAMA_KEYS - {"pretraining_tp", "mlp_bias"}) | {
    "hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types", "final_logit_softcapping",
    "attn_logit_softcapping", "use_bidirectional_attention",
}
_GEMMA2_KEYS = _GEMMA_KEYS | {"cache_implementation"}
_GEMMA3_KEYS = _GEMMA_KEYS | {"rope_local_base_freq", "_sliding_window_pattern", "sliding_window_pattern"}
_GEMMA3_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "ffn_post_norm": "post_feedforward_layernorm",
                 "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
# What each generation's config class fills in when config.json omits it.
_GEMMA_DEFAULTS = {
    "gemma2": dict(vocab_size=256000, max_position_embeddings=8192, rope_theta=10_000.0, sliding_window_pattern=2,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, max_position_embeddings=131072, rope_theta=1_000_000.0,
                        sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None),
}


def _gemma_config_from_hf(hf: dict[str, Any], source: str, model_type: str) -> dict[str, Any]:
    """Gemma 2 and 3: GeGLU (tanh GELU), RMSNorms with (1 + w), a norm after each sub-layer too, embeddings
    × √d_model, scores × query_pre_attn_scalar^-½, sliding-window layers (Gemma 2: every other one) and, where
    set, soft-capped attention scores and logits. Gemma 3 adds q/k norms and its local layers' own rope base."""
    gemma3, defaults = model_type == "gemma3_text", _GEMMA_DEFAULTS[model_type]
    _take(hf, source, _GEMMA3_KEYS if gemma3 else _GEMMA2_KEYS)
    _require(source, "hidden_activation", hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh"),
             ("gelu_pytorch_tanh",))
    _require(source, "use_bidirectional_attention", hf.get("use_bidirectional_attention") or False, (False,))
    _require(source, "attention_bias", hf.get("attention_bias", False), (False,))
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    full, local = rope.get("full_attention", rope), rope.get("sliding_attention", {})
    rope_type = full.get("rope_type", full.get("type", "default")) if full else "default"
    _require(source, "rope_type", rope_type, ("default", *ROPE_SCALING))
    _require(source, "sliding_attention rope_type", local.get("rope_type", "default"), ("default",))
    n_layers, n_heads = hf.get("num_hidden_layers", 26), hf.get("num_attention_heads", 8)
    pattern = hf.get("sliding_window_pattern", defaults["sliding_window_pattern"])
    layer_types = hf.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                            for i in range(n_layers)]
    for kind in layer_types:
        _require(source, "layer_types", kind, tuple(_QWEN2_LAYERS))
    scaling = _rope_scaling(full, rope_type, hf, source)
    caps = {field: hf.get(field, defaults[field]) for field in ("final_logit_softcapping", "attn_logit_softcapping")}
    values = dict(
        vocab_size=hf.get("vocab_size", defaults["vocab_size"]), n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_model=hf.get("hidden_size", 2304),
        d_ff=hf.get("intermediate_size", 9216), head_dim=hf.get("head_dim", 256),
        max_seq_len=_context(hf.get("max_position_embeddings", defaults["max_position_embeddings"]), scaling),
        positions="rope", rope_theta=float(full.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))),
        rope_scaling=scaling, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        ffn="geglu", bias=False, tie_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        initializer_range=hf.get("initializer_range", 0.02), sandwich_norm=True,
        scale_embeddings=True, attention_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
        attention_patterns=[_QWEN2_LAYERS[kind] for kind in layer_types],
        attention_window=hf.get("sliding_window") or 4096,
        attn_logit_softcap=caps["attn_logit_softcapping"], final_logit_softcap=caps["final_logit_softcapping"],
    )
    if gemma3:
        values.update(qk_norm=True, rope_local_theta=float(local.get("rope_theta",
                                                                     hf.get("rope_local_base_freq", 10_000.0))))
    return values


def _gemma_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """Llama's shared fields, less its activation, MLP bias and rope, plus Gemma's own; Gemma 3 (q/k norms) nests
    its two ropes by layer type."""
    shared = {k: v for k, v in _llama_config_to_hf(config).items()
              if k not in ("hidden_act", "mlp_bias", "rope_theta", "rope_scaling", "rope_parameters")}
    _, scaling, full = _hf_rope(config)
    values = dict(
        shared, hidden_activation="gelu_pytorch_tanh", attention_bias=False,
        query_pre_attn_scalar=_whole(config.attention_scale ** -2), sliding_window=config.attention_window,
        layer_types=["sliding_attention" if p == "local" else "full_attention" for p in config.layer_patterns()],
        final_logit_softcapping=config.final_logit_softcap, attn_logit_softcapping=config.attn_logit_softcap,
    )
    if config.qk_norm:
        local = {"rope_type": "default", "rope_theta": config.rope_local_theta}
        return dict(values, rope_parameters={"full_attention": full, "sliding_attention": local})
    return dict(values, rope_theta=config.rope_theta, rope_scaling=scaling, rope_parameters=full)


def _whole(value: float) -> int | float:
    """An integer where the float is one but for rounding (transformers' Gemma configs want int scalars)."""
    return round(value) if abs(value - round(value)) < 1e-6 else value


def _gemma_tensor_names(config: ModelConfig) -> dict[str, str]:
    """Everything but the norms, which `_gemma_to_ours` / `_gemma_to_theirs` move (their weights shift by 1)."""
    return {ours: theirs for ours, theirs in llama_tensor_names(config).items() if not ours.endswith("norm.weight")}


def _gemma_norm_names(config: ModelConfig) -> dict[str, str]:
    names = {"final_norm.weight": "model.norm.weight"}
    for i in range(config.n_layers):
        for ours, theirs in _GEMMA3_NORMS.items():
            if config.qk_norm or not ours.startswith("attn."):
                names[f"blocks.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def _gemma_to_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Gemma's RMSNorm scales by (1 + w), ours by g: g = 1 + w, computed in float32 as Gemma computes it."""
    ours = {}
    for our_name, their_name in _gemma_norm_names(config).items():
        weight = state.pop(their_name)
        ours[our_name] = (1.0 + weight.float()).to(weight.dtype)
    return ours


def _gemma_to_theirs(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    theirs = {}
    for our_name, their_name in _gemma_norm_names(config).items():
        weight = state.pop(our_name)
        theirs[their_name] = (weight.float() - 1.0).to(weight.dtype)
    return theirs


# ---- GPT-Neo (GPT-3-style alternating global and local attention) --------------------------------------------

_GPT_NEO_KEYS = {
    "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "activation_function",
    "max_position_embeddings", "window_size", "attention_types", "attention_layers", "layer_norm_epsilon",
    "initializer_range", "bos_token_id", "eos_token_id", "tie_word_embeddings", "embed_dropout", "attention_dropout",
    "resid_dropout", "classifier_dropout", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "gradient_checkpointing",
}
_NEO_PATTERNS = {"global": "dense", "local": "local"}


def _gpt_neo_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    _take(hf, source, _GPT_NEO_KEYS)
    _require(source, "activation_function", hf.get("activation_function", "gelu_new"),
             ("gelu_new", "gelu_pytorch_tanh"))
    layers = hf.get("attention_layers")
    if not layers:  # [[["global", "local"], 12]] -> global, local, global, local, ...
        layers = [kind for kinds, repeat in hf.get("attention_types", [[["global", "local"], 12]])
                  for _ in range(repeat) for kind in kinds]
    for kind in layers:
        _require(source, "attention_layers", kind, tuple(_NEO_PATTERNS))
    d_model = hf.get("hidden_size", 2048)
    return dict(
        vocab_size=hf.get("vocab_size", 50257), n_layers=hf.get("num_layers", len(layers)),
        n_heads=hf.get("num_heads", 8), d_model=d_model, d_ff=hf.get("intermediate_size") or 4 * d_model,
        max_seq_len=hf.get("max_position_embeddings", 2048), positions="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), ffn="gelu", bias=True, qkv_bias=False, attention_scale=1.0,
        attention_patterns=[_NEO_PATTERNS[kind] for kind in layers], attention_window=hf.get("window_size", 256),
        tie_embeddings=hf.get("tie_word_embeddings", True), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), initializer_range=hf.get("initializer_range", 0.02),
    )


def _gpt_neo_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    kinds = {"dense": "global", "local": "local"}
    layers = [kinds[p] for p in config.layer_patterns()]
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_layers=config.n_layers,
        num_heads=config.n_heads, intermediate_size=config.d_ff, activation_function="gelu_new",
        max_position_embeddings=config.max_seq_len, window_size=config.attention_window,
        attention_types=[[[kind], 1] for kind in layers], attention_layers=layers,
        layer_norm_epsilon=config.norm_eps, initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_embeddings, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
    )


def _gpt_neo_tensor_names(config: ModelConfig) -> dict[str, str]:
    names = dict(_GPT2_OUTER_TENSORS)
    for i in range(config.n_layers):
        layer = f"transformer.h.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            names[f"blocks.{i}.attn.{proj}.weight"] = f"{layer}attn.attention.{proj}.weight"
        for ours, theirs in (("attn_norm", "ln_1"), ("attn.o_proj", "attn.attention.out_proj"), ("ffn_norm", "ln_2"),
                             ("ffn.up_proj", "mlp.c_fc"), ("ffn.down_proj", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"{layer}{theirs}.{kind}"
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


# ---- Mixtral (Llama blocks whose FFN is a mixture of experts) ------------------------------------------------

_MIXTRAL_KEYS = _LLAMA_KEYS | {
    "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise", "sliding_window",
    "output_router_logits",
}


def _mixtral_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    _take(hf, source, _MIXTRAL_KEYS)
    _require(source, "router_jitter_noise", hf.get("router_jitter_noise", 0.0), (0, 0.0))
    values = _llama_config_from_hf({k: v for k, v in hf.items() if k not in _MIXTRAL_KEYS - _LLAMA_KEYS}, source)
    values.update(
        n_experts=hf.get("num_local_experts", 8), experts_per_token=hf.get("num_experts_per_tok", 2),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        max_seq_len=hf.get("max_position_embeddings", 4096 * 32), norm_eps=hf.get("rms_norm_eps", 1e-5),
    )
    if hf.get("sliding_window") is not None:  # Mistral's sliding window, on every layer
        values.update(attention_patterns=["local"], attention_window=hf["sliding_window"])
    return values


def _mixtral_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    values = _llama_config_to_hf(config)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
        values.pop(key, None)
    window = config.attention_window if config.layer_patterns()[0] == "local" else None
    return dict(values, num_local_experts=config.n_experts, num_experts_per_tok=config.experts_per_token,
                router_aux_loss_coef=config.router_aux_loss_coef, router_jitter_noise=0.0, sliding_window=window)


def _mixtral_tensor_names(config: ModelConfig) -> dict[str, str]:
    names = {ours: theirs for ours, theirs in llama_tensor_names(config).items() if ".ffn." not in ours}
    for i in range(config.n_layers):
        moe = f"model.layers.{i}.block_sparse_moe."
        names[f"blocks.{i}.ffn.router.weight"] = moe + "gate.weight"
        for e in range(config.n_experts):
            for ours, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                names[f"blocks.{i}.ffn.experts.{e}.{ours}.weight"] = f"{moe}experts.{e}.{theirs}.weight"
    return names


def _mixtral_to_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers ≥ 5 in memory (and some writers on disk) fuse the experts: mlp.experts.gate_up_proj
    [E, 2·d_ff, d] and mlp.experts.down_proj [E, d, d_ff]; spell them as the original per-expert w1/w3/w2."""
    for i in range(config.n_layers):
        fused, moe = f"model.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        if fused + "gate.weight" in state:
            state[moe + "gate.weight"] = state.pop(fused + "gate.weight")
        if fused + "experts.gate_up_proj" in state:
            gate_up, down = state.pop(fused + "experts.gate_up_proj"), state.pop(fused + "experts.down_proj")
            for e in range(gate_up.shape[0]):
                gate, up = gate_up[e].chunk(2, dim=0)
                state[f"{moe}experts.{e}.w1.weight"], state[f"{moe}experts.{e}.w3.weight"] = gate, up
                state[f"{moe}experts.{e}.w2.weight"] = down[e]
    return {}


# ---- BERT (encoder-only; sentence-transformers' MiniLM) -----------------------------------------------------

_BERT_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "position_embedding_type", "classifier_dropout", "is_decoder",
    "gradient_checkpointing", "bos_token_id", "eos_token_id", "tie_word_embeddings",
}
_BERT_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}


def _bert_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    _take(hf, source, _BERT_KEYS)
    _require(source, "hidden_act", hf.get("hidden_act", "gelu"), tuple(_BERT_ACTIVATIONS))
    _require(source, "position_embedding_type", hf.get("position_embedding_type", "absolute"), ("absolute",))
    _require(source, "is_decoder", hf.get("is_decoder", False), (False,))
    return dict(
        architecture="encoder", vocab_size=hf.get("vocab_size", 30522), n_layers=hf.get("num_hidden_layers", 12),
        n_heads=hf.get("num_attention_heads", 12), d_model=hf.get("hidden_size", 768),
        d_ff=hf.get("intermediate_size", 3072), max_seq_len=hf.get("max_position_embeddings", 512),
        positions="learned", norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
        ffn=_BERT_ACTIVATIONS[hf.get("hidden_act", "gelu")], bias=True, norm_position="post", final_norm=False,
        embedding_norm=True, type_vocab_size=hf.get("type_vocab_size", 2), tie_embeddings=False,
        pad_token_id=hf.get("pad_token_id", 0), initializer_range=hf.get("initializer_range", 0.02),
    )


def _bert_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    activation = {ours: theirs for theirs, ours in _BERT_ACTIVATIONS.items() if theirs != "gelu_pytorch_tanh"}
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, intermediate_size=config.d_ff, hidden_act=activation[config.ffn],
        max_position_embeddings=config.max_seq_len, type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.norm_eps, pad_token_id=config.pad_token_id, position_embedding_type="absolute",
        initializer_range=config.initializer_range, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def _bert_tensor_names(config: ModelConfig) -> dict[str, str]:
    names = {
        "embeddings.token_embedding.weight": "embeddings.word_embeddings.weight",
        "embeddings.position_embedding.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type_embedding.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(config.n_layers):
        layer = f"encoder.layer.{i}."
        for ours, theirs in (("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
                             ("attn.v_proj", "attention.self.value"), ("attn.o_proj", "attention.output.dense"),
                             ("attn_norm", "attention.output.LayerNorm"), ("ffn.up_proj", "intermediate.dense"),
                             ("ffn.down_proj", "output.dense"), ("ffn_norm", "output.LayerNorm")):
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"{layer}{theirs}.{kind}"
    return names


def _bert_to_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A task model (BertForMaskedLM, ...) puts `bert.` before the encoder's names."""
    for name in [name for name in state if name.startswith("bert.")]:
        state[name.removeprefix("bert.")] = state.pop(name)
    return {}


# ---- T5, Flan-T5 and mT5 (encoder–decoder with relative position biases) ---------------------------------------

_T5_KEYS = {
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon",
    "initializer_factor", "feed_forward_proj", "dense_act_fn", "is_gated_act", "bos_token_id", "eos_token_id",
    "tie_word_embeddings", "scale_decoder_outputs", "classifier_dropout", "is_decoder", "n_positions", "output_past",
}
_T5_FFN = {"relu": "relu", "gated-gelu": "geglu", "gated-silu": "swiglu"}  # feed_forward_proj -> our ffn
# An unused bias table old checkpoints carry in the first cross-attention (transformers ignores it too).
_T5_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def _t5_config_from_hf(hf: dict[str, Any], source: str, model_type: str) -> dict[str, Any]:
    _take(hf, source, _T5_KEYS)
    projection = hf.get("feed_forward_proj", "relu")
    _require(source, "feed_forward_proj", projection, tuple(_T5_FFN))
    _require(source, "is_decoder", hf.get("is_decoder", False), (False,))
    # transformers 5 writes tie_word_embeddings true for every T5 and keeps the old flag's meaning (a head tied to
    # the embeddings, reading the decoder output rescaled) in scale_decoder_outputs; mT5's head is its own, unscaled.
    tied = model_type == "t5" and hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    encoder_layers = hf.get("num_layers", 6)
    return dict(
        architecture="encoder-decoder", vocab_size=hf.get("vocab_size", 32128), n_encoder_layers=encoder_layers,
        n_layers=hf.get("num_decoder_layers") or encoder_layers, n_heads=hf.get("num_heads", 8),
        d_model=hf.get("d_model", 512), head_dim=hf.get("d_kv", 64), d_ff=hf.get("d_ff", 2048),
        max_seq_len=hf.get("n_positions", 512), positions="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), ffn=_T5_FFN[projection], bias=False, attention_scale=1.0,
        tie_embeddings=tied, scale_decoder_output=tied, bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id", 1), pad_token_id=hf.get("pad_token_id", 0),
        decoder_start_token_id=hf.get("decoder_start_token_id"),
    )


def _t5_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    projection = {ours: theirs for theirs, ours in _T5_FFN.items()}[config.ffn]
    return dict(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.head_dim, d_ff=config.d_ff,
        num_layers=config.n_encoder_layers, num_decoder_layers=config.n_layers, num_heads=config.n_heads,
        relative_attention_num_buckets=config.relative_buckets,
        relative_attention_max_distance=config.relative_max_distance, layer_norm_epsilon=config.norm_eps,
        feed_forward_proj=projection, tie_word_embeddings=config.tie_embeddings,
        scale_decoder_outputs=config.scale_decoder_output, n_positions=config.max_seq_len, is_encoder_decoder=True,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id, dropout_rate=0.0, initializer_factor=1.0,
    )


def _t5_tensor_names(config: ModelConfig) -> dict[str, str]:
    names = {
        "embeddings.token_embedding.weight": "shared.weight",
        "encoder_norm.weight": "encoder.final_layer_norm.weight",
        "final_norm.weight": "decoder.final_layer_norm.weight",
        # T5 keeps each stack's one bias table in its first layer's self-attention.
        "encoder_position_bias.bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "position_bias.bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    }
    gated = config.ffn in ("geglu", "swiglu")
    ffn = {"gate_proj": "wi_0", "up_proj": "wi_1", "down_proj": "wo"} if gated else {"up_proj": "wi", "down_proj": "wo"}
    attention = [("attn", "attn_norm", "SelfAttention")]
    for stack, ours, count, sublayers in (("encoder", "encoder_blocks", config.n_encoder_layers, attention),
                                          ("decoder", "blocks", config.n_layers,
                                           [*attention, ("cross_attn", "cross_norm", "EncDecAttention")])):
        for i in range(count):
            block, layer = f"{ours}.{i}.", f"{stack}.block.{i}.layer."
            for index, (attn, norm, theirs) in enumerate(sublayers):
                names[f"{block}{norm}.weight"] = f"{layer}{index}.layer_norm.weight"
                for proj in "qkvo":
                    names[f"{block}{attn}.{proj}_proj.weight"] = f"{layer}{index}.{theirs}.{proj}.weight"
            last = len(sublayers)
            names[f"{block}ffn_norm.weight"] = f"{layer}{last}.layer_norm.weight"
            for our_proj, their_proj in ffn.items():
                names[f"{block}ffn.{our_proj}.weight"] = f"{layer}{last}.DenseReluDense.{their_proj}.weight"
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _t5_to_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Both stacks' embed_tokens are `shared` (some writers store them too); a head transformers 5 tied though the
    config keeps it apart (no lm_head stored) is the embedding matrix."""
    stacks = [state.pop(f"{stack}.embed_tokens.weight", None) for stack in ("encoder", "decoder")]
    if "shared.weight" not in state and stacks[0] is not None:
        state["shared.weight"] = stacks[0]
    if not config.tie_embeddings and "lm_head.weight" not in state and "shared.weight" in state:
        state["lm_head.weight"] = state["shared.weight"]
    return {}


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "GPT2LMHeadModel", _gpt2_config_from_hf, _gpt2_config_to_hf, _gpt2_tensor_names,
                   _gpt2_to_ours, _gpt2_to_theirs, ignored_tensors=(".attn.bias", ".attn.masked_bias"),
                   base_prefix="transformer."),
    "llama": Family("llama", "LlamaForCausalLM", _llama_config_from_hf, _llama_config_to_hf, llama_tensor_names,
                    ignored_tensors=(".rotary_emb.inv_freq",)),
    "mistral": Family("mistral", "MistralForCausalLM", _mistral_config_from_hf, _mistral_config_to_hf,
                      llama_tensor_names, ignored_tensors=(".rotary_emb.inv_freq",)),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _qwen2_config_from_hf, _qwen2_config_to_hf, _qwen_tensor_names,
                    ignored_tensors=(".rotary_emb.inv_freq",)),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", _qwen3_config_from_hf, _qwen3_config_to_hf, _qwen_tensor_names,
                    ignored_tensors=(".rotary_emb.inv_freq",)),
    # Read only: a model of Phi-3's math is written as Llama (or Mistral, with a window), which transformers reads.
    "phi3": Family("phi3", "Phi3ForCausalLM", _phi3_config_from_hf, None, _phi3_tensor_names, _phi3_to_ours,
                   ignored_tensors=(".rotary_emb.inv_freq",)),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", partial(_gemma_config_from_hf, model_type="gemma2"),
                     _gemma_config_to_hf, _gemma_tensor_names, _gemma_to_ours, _gemma_to_theirs),
    "gemma3_text": Family("gemma3_text", "Gemma3ForCausalLM", partial(_gemma_config_from_hf, model_type="gemma3_text"),
                          _gemma_config_to_hf, _gemma_tensor_names, _gemma_to_ours, _gemma_to_theirs),
    "gpt_neo": Family("gpt_neo", "GPTNeoForCausalLM", _gpt_neo_config_from_hf, _gpt_neo_config_to_hf,
                      _gpt_neo_tensor_names, ignored_tensors=(".attn.attention.bias", ".attn.attention.masked_bias"),
                      base_prefix="transformer."),
    "mixtral": Family("mixtral", "MixtralForCausalLM", _mixtral_config_from_hf, _mixtral_config_to_hf,
                      _mixtral_tensor_names, _mixtral_to_ours, ignored_tensors=(".rotary_emb.inv_freq",)),
    "bert": Family("bert", "BertModel", _bert_config_from_hf, _bert_config_to_hf, _bert_tensor_names, _bert_to_ours,
                   ignored_tensors=("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"),
                   base_prefix=""),
    "t5": Family("t5", "T5ForConditionalGeneration", partial(_t5_config_from_hf, model_type="t5"), _t5_config_to_hf,
                 _t5_tensor_names, _t5_to_ours, ignored_tensors=_T5_IGNORED, base_prefix=""),
    # Read only: mT5 is T5's math with an untied, unscaled head, which a T5 config says as well.
    "mt5": Family("mt5", "MT5ForConditionalGeneration", partial(_t5_config_from_hf, model_type="mt5"), None,
                  _t5_tensor_names, _t5_to_ours, ignored_tensors=_T5_IGNORED, base_prefix=""),
}


def family_for(config: ModelConfig) -> Family | None:
    """The transformers family whose architecture is exactly this config's, if any."""
    patterns = set(config.layer_patterns())
    mha = config.n_kv_heads == config.n_heads and config.head_dim * config.n_heads == config.d_model
    uncapped = config.attn_logit_softcap is None and config.final_logit_softcap is None
    decoder = config.architecture == "decoder" and config.norm_position == "pre" and config.final_norm \
        and not config.embedding_norm and not config.type_vocab_size and not config.scale_embeddings \
        and not config.sandwich_norm and config.rope_local_theta is None and uncapped
    dense = patterns == {"dense"} and config.n_experts == 0
    default_attention = config.qkv_bias in (None, config.bias) and config.attention_scale is None \
        and not config.qk_norm
    gpt2_like = config.positions == "learned" and config.norm == "layernorm" and config.bias and mha
    llama_like = config.positions == "rope" and config.norm == "rmsnorm" and config.ffn == "swiglu"
    if decoder and dense and default_attention and gpt2_like and config.ffn == "gelu":
        return FAMILIES["gpt2"]
    if decoder and dense and default_attention and llama_like:
        return FAMILIES["llama"]
    one_expert = config.n_experts == 0
    if decoder and llama_like and default_attention and not config.bias and one_expert and patterns == {"local"}:
        return FAMILIES["mistral"]
    qwen_like = decoder and llama_like and config.attention_scale is None and one_expert \
        and patterns <= {"dense", "local"}
    if qwen_like and config.qkv_bias is True and not config.bias and not config.qk_norm:
        return FAMILIES["qwen2"]
    if qwen_like and config.qk_norm and config.qkv_bias in (None, config.bias):
        return FAMILIES["qwen3"]
    gemma = config.architecture == "decoder" and config.norm_position == "pre" and config.final_norm \
        and config.scale_embeddings and config.sandwich_norm and config.ffn == "geglu" \
        and config.norm == "rmsnorm" and config.positions == "rope" and not config.bias and not config.qkv_bias \
        and config.attention_scale is not None and one_expert \
        and patterns <= {"dense", "local"} and not config.embedding_norm and not config.type_vocab_size
    if gemma and config.qk_norm and config.rope_local_theta is not None:
        return FAMILIES["gemma3_text"]
    if gemma and not config.qk_norm and config.rope_local_theta is None:  # Gemma 2: one rope, no q/k norms
        return FAMILIES["gemma2"]
    if decoder and gpt2_like and config.ffn == "gelu" and config.n_experts == 0 and config.qkv_bias is False \
            and config.attention_scale == 1.0 and patterns <= {"dense", "local"}:
        return FAMILIES["gpt_neo"]
    if decoder and llama_like and default_attention and not config.bias and config.n_experts \
            and config.expert_capacity_factor is None and patterns in ({"dense"}, {"local"}):
        return FAMILIES["mixtral"]
    if config.architecture == "encoder" and config.norm_position == "post" and not config.final_norm \
            and config.embedding_norm and gpt2_like and config.ffn in ("gelu", "gelu_exact", "relu") \
            and default_attention and config.n_experts == 0 and not config.scale_embeddings and uncapped:
        return FAMILIES["bert"]
    if config.architecture == "encoder-decoder" and config.positions == "relative" and config.norm == "rmsnorm" \
            and config.norm_position == "pre" and config.final_norm and not config.bias and not config.qkv_bias \
            and config.attention_scale == 1.0 and config.ffn in _T5_FFN.values() and config.n_experts == 0 \
            and config.n_kv_heads == config.n_heads and config.tie_embeddings == config.scale_decoder_output \
            and not (config.scale_embeddings or config.embedding_norm or config.type_vocab_size or config.qk_norm
                     or config.sandwich_norm) and uncapped:
        return FAMILIES["t5"]
    return None
