"""Hugging Face checkpoint directories, both ways: config.json + model.safetensors (sharded too) <-> our model.

Each supported family is one table of tensor names (ours -> theirs) and two small config translations.
Weights are read with safetensors only: a pickle file is never unpickled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SCORE_WEIGHT = "score.weight"  # a sequence-classification head (transformers' name)

# Keys every transformers config.json may carry that say nothing about the architecture's math.
_GENERIC_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
    "pad_token_id", "id2label", "label2id", "problem_type", "return_dict", "output_hidden_states",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "task_specific_params",
    "_attn_implementation_autoset", "torchscript", "tie_encoder_decoder", "prefix", "sep_token_id",
    "decoder_start_token_id", "finetuning_task", "add_cross_attention", "cross_attention_hidden_size",
    "quantization_config",  # checked by sparkgpt.model.quant (ours loads; any other method is refused there)
}


@dataclasses.dataclass(frozen=True)
class Family:
    """How one transformers model family spells our ModelConfig and tensor names."""

    model_type: str
    architecture: str
    config_from_hf: Callable[[dict[str, Any], str], dict[str, Any]]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    tensor_names: Callable[[ModelConfig], dict[str, str]]  # our name -> their name
    to_ours: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]] | None = None
    to_theirs: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]] | None = None
    ignored_tensors: tuple[str, ...] = ()  # suffixes of buffers older checkpoints saved (masks, inv_freq)
    base_prefix: str = "model."  # what a task model (…ForCausalLM) puts before the base model's tensor names


def _take(hf: dict[str, Any], source: str, known: set[str]) -> None:
    unknown = sorted(set(hf) - known - _GENERIC_KEYS)
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
    _require(source, "rope_type", rope.get("rope_type", rope.get("type", "default")), ("default",))
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise SparkGPTError(f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported")
    n_heads = hf.get("num_attention_heads", 32)
    return dict(
        vocab_size=hf.get("vocab_size", 32000), n_layers=hf.get("num_hidden_layers", 32), n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_model=hf.get("hidden_size", 4096),
        d_ff=hf.get("intermediate_size", 11008), head_dim=hf.get("head_dim"),
        max_seq_len=hf.get("max_position_embeddings", 2048), positions="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), ffn="swiglu", bias=attention_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), initializer_range=hf.get("initializer_range", 0.02),
    )


def _llama_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, initializer_range=config.initializer_range,
        rms_norm_eps=config.norm_eps, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_embeddings, attention_bias=config.bias, mlp_bias=config.bias,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta.
        rope_theta=config.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )


def _llama_tensor_names(config: ModelConfig) -> dict[str, str]:
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
    names = {ours: theirs for ours, theirs in _llama_tensor_names(config).items() if ".ffn." not in ours}
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


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "GPT2LMHeadModel", _gpt2_config_from_hf, _gpt2_config_to_hf, _gpt2_tensor_names,
                   _gpt2_to_ours, _gpt2_to_theirs, ignored_tensors=(".attn.bias", ".attn.masked_bias"),
                   base_prefix="transformer."),
    "llama": Family("llama", "LlamaForCausalLM", _llama_config_from_hf, _llama_config_to_hf, _llama_tensor_names,
                    ignored_tensors=(".rotary_emb.inv_freq",)),
    "gpt_neo": Family("gpt_neo", "GPTNeoForCausalLM", _gpt_neo_config_from_hf, _gpt_neo_config_to_hf,
                      _gpt_neo_tensor_names, ignored_tensors=(".attn.attention.bias", ".attn.attention.masked_bias"),
                      base_prefix="transformer."),
    "mixtral": Family("mixtral", "MixtralForCausalLM", _mixtral_config_from_hf, _mixtral_config_to_hf,
                      _mixtral_tensor_names, _mixtral_to_ours, ignored_tensors=(".rotary_emb.inv_freq",)),
    "bert": Family("bert", "BertModel", _bert_config_from_hf, _bert_config_to_hf, _bert_tensor_names, _bert_to_ours,
                   ignored_tensors=("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"),
                   base_prefix=""),
}


def family_for(config: ModelConfig) -> Family | None:
    """The transformers family whose architecture is exactly this config's, if any."""
    patterns = set(config.layer_patterns())
    mha = config.n_kv_heads == config.n_heads and config.head_dim * config.n_heads == config.d_model
    decoder = config.architecture == "decoder" and config.norm_position == "pre" and config.final_norm \
        and not config.embedding_norm and not config.type_vocab_size and not config.scale_embeddings
    dense = patterns == {"dense"} and config.n_experts == 0
    default_attention = config.qkv_bias in (None, config.bias) and config.attention_scale is None
    gpt2_like = config.positions == "learned" and config.norm == "layernorm" and config.bias and mha
    llama_like = config.positions == "rope" and config.norm == "rmsnorm" and config.ffn == "swiglu"
    if decoder and dense and default_attention and gpt2_like and config.ffn == "gelu":
        return FAMILIES["gpt2"]
    if decoder and dense and default_attention and llama_like:
        return FAMILIES["llama"]
    if decoder and gpt2_like and config.ffn == "gelu" and config.n_experts == 0 and config.qkv_bias is False \
            and config.attention_scale == 1.0 and patterns <= {"dense", "local"}:
        return FAMILIES["gpt_neo"]
    if decoder and llama_like and default_attention and not config.bias and config.n_experts \
            and config.expert_capacity_factor is None and patterns in ({"dense"}, {"local"}):
        return FAMILIES["mixtral"]
    if config.architecture == "encoder" and config.norm_position == "post" and not config.final_norm \
            and config.embedding_norm and gpt2_like and config.ffn in ("gelu", "gelu_exact", "relu") \
            and default_attention and config.n_experts == 0 and not config.scale_embeddings:
        return FAMILIES["bert"]
    return None


# ---- reading ----------------------------------------------------------------------------------------------

def read_config(directory: Path) -> tuple[ModelConfig, Family | None]:
    """The ModelConfig a checkpoint directory describes (a transformers family, or our own `sparkgpt` type)."""
    path = directory / CONFIG_FILE
    hf = read_json_object(path)
    model_type = hf.get("model_type")
    if model_type == "sparkgpt":
        fields = {k: v for k, v in hf.items() if k not in _GENERIC_KEYS}
        return ModelConfig.from_dict(fields, source=str(path)), None
    if model_type not in FAMILIES:
        raise SparkGPTError(
            f"{path}: model_type {model_type!r} is not supported; expected one of {', '.join([*FAMILIES, 'sparkgpt'])}"
        )
    family = FAMILIES[model_type]
    values = family.config_from_hf(hf, str(path))
    try:
        return ModelConfig.from_dict(values, source=str(path)), family
    except SparkGPTError as error:
        raise SparkGPTError(f"{path}: {error}") from None


def weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards its index names. Pickled weights are refused, never opened."""
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SparkGPTError(f"{index}: expected a non-empty 'weight_map' object")
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise SparkGPTError(f"{index}: names shard {shard.name}, which is missing")
        return shards
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise SparkGPTError(
            f"{directory}: only pickle weights (*.bin/*.pt) found; sparkgpt reads safetensors only and never "
            "unpickles files (convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise SparkGPTError(f"{directory}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as reader:
                for name in reader.keys():  # noqa: SIM118 (a safetensors reader, not a dict)
                    tensors[name] = reader.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise SparkGPTError(f"{file}: not a valid safetensors file ({error})") from None
    return tensors


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor], config: ModelConfig, family: Family | None, source: str
) -> dict[str, torch.Tensor]:
    """Rename (and reshape, for GPT-2's Conv1D) a checkpoint's tensors into our model's state dict names."""
    if family is None:
        return tensors
    # Checkpoints saved from a bare base model (GPT2Model, LlamaModel) lack the `transformer.` / `model.` prefix.
    base_prefix = family.base_prefix
    tensors = {(name if name.startswith(base_prefix) or name == "lm_head.weight" else base_prefix + name): t
               for name, t in tensors.items() if not name.endswith(family.ignored_tensors)}
    ours = family.to_ours(tensors, config) if family.to_ours else {}
    missing = []
    for our_name, their_name in family.tensor_names(config).items():
        if their_name in tensors:
            ours[our_name] = tensors.pop(their_name)
        else:
            missing.append(their_name)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied head some writers store anyway; it is the embedding
    if missing:
        raise SparkGPTError(f"{source}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if tensors:
        raise SparkGPTError(f"{source}: unexpected tensor(s) {', '.join(sorted(tensors)[:5])}")
    return ours


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SparkGPTError(f"{source}: missing tensor(s) {', '.join(missing[:5])}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise SparkGPTError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise SparkGPTError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}; "
                f"config.json implies {tuple(expected[name].shape)}"
            )


# ---- writing ----------------------------------------------------------------------------------------------

def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    family = family_for(config)
    dtype_name = str(dtype).removeprefix("torch.")
    if family is None:
        fields = config.to_dict()
        fields.pop("attention_backend")
        return {"model_type": "sparkgpt", "dtype": dtype_name, **fields}
    return {"architectures": [family.architecture], "model_type": family.model_type, "dtype": dtype_name,
            **family.config_to_hf(config)}


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    family = family_for(config)
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # one matrix, stored once (as transformers does)
    if family is None:
        return state
    theirs = family.to_theirs(state, config) if family.to_theirs else {}
    for our_name, their_name in family.tensor_names(config).items():
        theirs[their_name] = state.pop(our_name)
    return theirs


def write_checkpoint(directory: Path, config: ModelConfig, state: dict[str, torch.Tensor],
                     labels: list[str] | None = None) -> None:
    """Write config.json, model.safetensors and generation_config.json into `directory` (already staged).

    With `labels`, `state` also holds a classification head `score.weight`; it is saved under that name and the
    labels go into config.json as id2label / label2id, which transformers' *ForSequenceClassification reads."""
    state = dict(state)
    score = state.pop(SCORE_WEIGHT) if labels else None
    dtype = next(iter(state.values())).dtype
    hf_config = config_to_hf(config, dtype)
    if labels:
        if "architectures" in hf_config:
            hf_config["architectures"] = [hf_config["architectures"][0].replace("ForCausalLM",
                                                                                "ForSequenceClassification")]
        hf_config["id2label"] = dict(enumerate(labels))
        hf_config["label2id"] = {label: index for index, label in enumerate(labels)}
        if config.pad_token_id is None and config.eos_token_id is not None:  # transformers pools by the pad id
            eos = config.eos_token_id
            hf_config["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    write_json(directory / CONFIG_FILE, hf_config)
    tensors = state_dict_to_hf(state, config)
    if score is not None:
        tensors[SCORE_WEIGHT] = score
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    write_json(directory / GENERATION_CONFIG_FILE, {k: v for k, v in generation.items() if v is not None})


def write_model(directory: Path, model: torch.nn.Module) -> None:
    """A model as a checkpoint directory: a GPT, Encoder or EncoderDecoder, or a SequenceClassifier (its decoder
    with the head and labels)."""
    labels = getattr(model, "labels", None)
    state = model.state_dict()
    if labels is not None:
        state = {name.removeprefix("backbone."): tensor for name, tensor in state.items()}
    write_checkpoint(directory, model.config, state, labels)


# ---- whole models -----------------------------------------------------------------------------------------

def read_model_state(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str] | None, str]:
    """(config, our state dict, classification labels or None, the weights' file for errors) of a checkpoint
    directory. A classifier's state
    holds `score.weight` beside the decoder's tensors; an untied decoder saved without its unused lm_head (as
    transformers saves classifiers) gets a zero one, never used."""
    config, family = read_config(directory)
    files = weight_files(directory)
    source = str(files[0] if len(files) == 1 else directory / WEIGHTS_INDEX_FILE)
    tensors = read_tensors(files)
    score = tensors.pop(SCORE_WEIGHT, None)
    labels = None
    if score is not None:
        labels = _labels(read_json_object(directory / CONFIG_FILE), score.shape[0], source)
        if not config.tie_embeddings and "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = torch.zeros(config.vocab_size, config.d_model, dtype=score.dtype)
    state = state_dict_from_hf(tensors, config, family, source)
    if score is not None:
        state[SCORE_WEIGHT] = score
    return config, state, labels, source


def _labels(hf_config: dict[str, Any], count: int, source: str) -> list[str]:
    id2label = hf_config.get("id2label")
    if not isinstance(id2label, dict) or set(id2label) != {str(i) for i in range(count)}:
        raise SparkGPTError(f"{source}: a classification head of {count} labels needs 'id2label' with keys "
                            f"0..{count - 1} in config.json")
    return [str(id2label[str(i)]) for i in range(count)]


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Build our model from a checkpoint directory (ours or transformers'), weights converted to `dtype`: a GPT,
    Encoder or EncoderDecoder, or a SequenceClassifier when the checkpoint has a classification head."""
    from sparkgpt.model import model_class, quant
    from sparkgpt.model.heads import SequenceClassifier

    directory = Path(directory)
    if quant.is_quantized_checkpoint(directory):
        return quant.load_checkpoint(directory, dtype, device)
    config, state, labels, source = read_model_state(directory)
    score = state.pop(SCORE_WEIGHT, None)
    cls = model_class(config)
    with torch.device("meta"):
        expected = cls(config).state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    check_shapes(state, expected, source)
    state = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for name, t in state.items()}
    model = cls.from_state_dict(config, state)
    if score is None:
        return model
    classifier = SequenceClassifier(model, labels)
    if tuple(score.shape) != tuple(classifier.score.weight.shape):
        raise SparkGPTError(f"{source}: {SCORE_WEIGHT} has shape {tuple(score.shape)}; expected "
                            f"{tuple(classifier.score.weight.shape)}")
    with torch.no_grad():
        classifier.score.weight.copy_(score)
    return classifier.eval()
