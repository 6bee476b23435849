"""transformers' ViT and CLIP checkpoints (`ViTModel`, `ViTForImageClassification`'s encoder, `CLIPModel`:
save_pretrained folders, safetensors), both ways, onto `sparkgpt.model.vision`, and their image processors'
settings (preprocessor_config.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparkgpt.checkpoint.families import GENERIC_KEYS
from sparkgpt.checkpoint.hf import CONFIG_FILE, WEIGHTS_FILE, check_shapes, read_tensors, take_tensors, weight_files
from sparkgpt.config import ModelConfig
from sparkgpt.data.images import CLIP_PREPROCESSING, VIT_PREPROCESSING, ImagePreprocessing
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object, write_json
from sparkgpt.model.vision import CLIP, CLIPConfig, VisionConfig, ViT, vision_config

PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_TYPES = ("vit", "clip")

# Fields older transformers wrote into every (sub-)config: generation defaults and bookkeeping, none of which
# changes what an encoder computes.
LEGACY_KEYS = {
    "bad_words_ids", "begin_suppress_tokens", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty", "return_dict_in_generate",
    "suppress_tokens", "temperature", "tf_legacy_loss", "top_k", "top_p", "typical_p", "use_bfloat16", "is_decoder",
    "pruned_heads", "tie_word_embeddings", "bos_token_id", "dropout", "attention_dropout", "initializer_factor",
    "projection_dim",  # a tower's own copy; CLIPModel projects to the top-level projection_dim
}
# transformers' hidden_act -> our ffn.
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "quick_gelu": "quick_gelu",
               "relu": "relu"}


def checkpoint_kind(directory: Path) -> str | None:
    """"vit" or "clip" for such a transformers checkpoint directory, else None."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    model_type = read_json_object(path).get("model_type")
    return model_type if model_type in MODEL_TYPES else None


def _check_keys(hf: dict[str, Any], known: set[str], source: str) -> None:
    unknown = sorted(set(hf) - known - GENERIC_KEYS - LEGACY_KEYS)
    if unknown:
        raise SparkGPTError(f"{source}: unsupported config field(s) {', '.join(unknown)}")


def _choose(hf: dict[str, Any], field: str, default: Any, allowed: tuple[Any, ...], source: str) -> Any:
    value = hf.get(field, default)
    if value not in allowed:
        raise SparkGPTError(f"{source}: field {field!r} is {value!r}; supported: {', '.join(map(repr, allowed))}")
    return value


def _square(hf: dict[str, Any], field: str, default: int, source: str) -> int:
    """ViT and CLIP allow [height, width]; our towers take square images and patches."""
    value = hf.get(field, default)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise SparkGPTError(f"{source}: field {field!r} is {value!r}; supported: one integer (square)")
    return value


def _tower(hf: dict[str, Any], source: str, layer_norm_eps: float) -> dict[str, Any]:
    """The block shape both families spell alike."""
    act = _choose(hf, "hidden_act", "quick_gelu", tuple(ACTIVATIONS), source)
    return dict(d_model=hf.get("hidden_size", 768), n_layers=hf.get("num_hidden_layers", 12),
                n_heads=hf.get("num_attention_heads", 12), d_ff=hf.get("intermediate_size", 3072),
                ffn=ACTIVATIONS[act], norm_eps=hf.get("layer_norm_eps", layer_norm_eps),
                initializer_range=hf.get("initializer_range", 0.02))


def _tower_to_hf(config: ModelConfig) -> dict[str, Any]:
    act = {ours: theirs for theirs, ours in ACTIVATIONS.items() if theirs != "gelu_pytorch_tanh"}.get(config.ffn)
    plain = config.norm == "layernorm" and config.bias and config.n_kv_heads == config.n_heads \
        and config.head_dim * config.n_heads == config.d_model and not config.qk_norm and not config.sandwich_norm \
        and config.attention_scale is None and config.attn_logit_softcap is None and not config.n_experts
    if act is None or not plain:
        raise SparkGPTError("this tower's blocks (ffn, norm, heads or attention) differ from ViT's and CLIP's, which "
                            "transformers' config cannot say")
    return dict(hidden_size=config.d_model, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                intermediate_size=config.d_ff, hidden_act=act, layer_norm_eps=config.norm_eps,
                initializer_range=config.initializer_range)


def _built(make: Any, source: str) -> Any:
    try:
        return make()
    except SparkGPTError as error:
        raise SparkGPTError(f"{source}: {error}") from None


# ---- ViT ------------------------------------------------------------------------------------------------------

_VIT_KEYS = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "image_size",
    "patch_size", "num_channels", "qkv_bias", "encoder_stride", "pooler_output_size", "pooler_act",
}


def vit_config_from_hf(hf: dict[str, Any], source: str, pooler: bool) -> VisionConfig:
    """Our config from a ViT config.json; `pooler`: whether the weights hold the pooler (ViTModel's
    add_pooling_layer, which config.json does not record)."""
    _check_keys(hf, _VIT_KEYS, source)
    _choose(hf, "pooler_act", "tanh", ("tanh",), source)
    tower = _tower({"hidden_act": "gelu", **hf}, source, 1e-12)
    return _built(lambda: vision_config(
        **tower, image_size=_square(hf, "image_size", 224, source), patch_size=_square(hf, "patch_size", 16, source),
        num_channels=hf.get("num_channels", 3), qkv_bias=hf.get("qkv_bias", True), final_norm=True,
        embedding_norm=False, patch_bias=True, pooled_norm=False,
        pooler_size=(hf.get("pooler_output_size") or tower["d_model"]) if pooler else None,
    ), source)


def vit_config_to_hf(config: VisionConfig) -> dict[str, Any]:
    return dict(_tower_to_hf(config), architectures=["ViTModel"], model_type="vit", image_size=config.image_size,
                patch_size=config.patch_size, num_channels=config.num_channels,
                qkv_bias=config.qkv_bias is not False, pooler_output_size=config.pooler_size or config.d_model,
                pooler_act="tanh", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _layer_names(ours: str, theirs: str, pairs: list[tuple[str, str]], n_layers: int,
                 no_qkv_bias: bool = False) -> dict[str, str]:
    names = {}
    for i in range(n_layers):
        for our_part, their_part in pairs:
            for kind in ("weight", "bias"):
                if not (kind == "bias" and no_qkv_bias and our_part in ("attn.q_proj", "attn.k_proj", "attn.v_proj")):
                    names[f"{ours}.{i}.{our_part}.{kind}"] = f"{theirs}.{i}.{their_part}.{kind}"
    return names


def vit_tensor_names(config: VisionConfig) -> dict[str, str]:
    """Our name -> transformers' on disk. The class token and positions are reshaped: theirs carry leading 1s."""
    names = {
        "embeddings.cls_token": "embeddings.cls_token",
        "embeddings.position_embedding.weight": "embeddings.position_embeddings",
        "embeddings.patch_proj.weight": "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_proj.bias": "embeddings.patch_embeddings.projection.bias",
        "final_norm.weight": "layernorm.weight", "final_norm.bias": "layernorm.bias",
    }
    if config.pooler_size is not None:
        names.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    pairs = [("attn.q_proj", "attention.attention.query"), ("attn.k_proj", "attention.attention.key"),
             ("attn.v_proj", "attention.attention.value"), ("attn.o_proj", "attention.output.dense"),
             ("attn_norm", "layernorm_before"), ("ffn_norm", "layernorm_after"), ("ffn.up_proj", "intermediate.dense"),
             ("ffn.down_proj", "output.dense")]
    return names | _layer_names("blocks", "encoder.layer", pairs, config.n_layers, config.qkv_bias is False)


# ---- CLIP -----------------------------------------------------------------------------------------------------

_CLIP_KEYS = {"text_config", "vision_config", "text_config_dict", "vision_config_dict", "projection_dim",
              "logit_scale_init_value", "initializer_factor"}
_CLIP_TEXT_KEYS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings", "hidden_act", "layer_norm_eps", "initializer_range", "eos_token_id"}
_CLIP_VISION_KEYS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                     "image_size", "patch_size", "hidden_act", "layer_norm_eps", "initializer_range"}
# CLIPTextConfig's and CLIPVisionConfig's defaults, which a `*_config_dict` (configs of transformers < 4.28) brings
# back over its `*_config` (CLIPConfig.__post_init__ rebuilds the tower from the dict alone).
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      initializer_range=0.02, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                        initializer_range=0.02)


def _sub_config(hf: dict[str, Any], name: str, defaults: dict[str, Any], source: str) -> dict[str, Any]:
    values = hf.get(f"{name}_config") or {}
    override = hf.get(f"{name}_config_dict")
    if not isinstance(values, dict) or not isinstance(override or {}, dict):
        raise SparkGPTError(f"{source}: field '{name}_config' must be an object")
    return {**values, **defaults, **override} if override is not None else {**defaults, **values}


def clip_config_from_hf(hf: dict[str, Any], source: str) -> CLIPConfig:
    _check_keys(hf, _CLIP_KEYS, source)
    text = _sub_config(hf, "text", _TEXT_DEFAULTS, source)
    vision = _sub_config(hf, "vision", _VISION_DEFAULTS, source)
    _check_keys(text, _CLIP_TEXT_KEYS, f"{source} (text_config)")
    _check_keys(vision, _CLIP_VISION_KEYS, f"{source} (vision_config)")
    eos = text["eos_token_id"]
    # transformers reads a text at its largest id when eos_token_id is 2, the value configs had before 4.31.
    pooling = "argmax" if eos == 2 else "eos"
    text_config = _built(lambda: ModelConfig.from_dict(dict(
        _tower(text, f"{source} (text_config)", 1e-5), architecture="decoder", vocab_size=text["vocab_size"],
        max_seq_len=text["max_position_embeddings"], positions="learned", norm="layernorm", bias=True,
        norm_position="pre", final_norm=True, tie_embeddings=False, eos_token_id=eos,
        bos_token_id=text.get("bos_token_id"), pad_token_id=text.get("pad_token_id"),
    ), source="CLIP text config"), source)
    vision_source = f"{source} (vision_config)"
    tower = _built(lambda: vision_config(
        **_tower(vision, vision_source, 1e-5), image_size=_square(vision, "image_size", 224, vision_source),
        patch_size=_square(vision, "patch_size", 32, vision_source), num_channels=vision["num_channels"],
        embedding_norm=True, final_norm=False, patch_bias=False, pooled_norm=True, pooler_size=None,
    ), source)
    return _built(lambda: CLIPConfig(text=text_config, vision=tower, projection_dim=hf.get("projection_dim", 512),
                                     logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)),
                                     text_pooling=pooling), source)


def clip_config_to_hf(config: CLIPConfig) -> dict[str, Any]:
    text, vision = config.text, config.vision
    eos = 2 if config.text_pooling == "argmax" else text.eos_token_id
    if config.text_pooling == "eos" and eos == 2:
        raise SparkGPTError("a CLIP whose end-of-text id is 2 cannot be saved for transformers, which would read its "
                            "texts at their largest id instead")
    text_config = dict(_tower_to_hf(text), vocab_size=text.vocab_size, max_position_embeddings=text.max_seq_len,
                       eos_token_id=eos, bos_token_id=text.bos_token_id, pad_token_id=text.pad_token_id)
    vision_values = dict(_tower_to_hf(vision), image_size=vision.image_size, patch_size=vision.patch_size,
                         num_channels=vision.num_channels)
    return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=config.projection_dim,
                logit_scale_init_value=config.logit_scale_init, text_config=text_config,
                vision_config=vision_values)


def clip_tensor_names(config: CLIPConfig) -> dict[str, str]:
    pairs = [("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
             ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.out_proj"), ("attn_norm", "layer_norm1"),
             ("ffn_norm", "layer_norm2"), ("ffn.up_proj", "mlp.fc1"), ("ffn.down_proj", "mlp.fc2")]
    names = {
        "logit_scale": "logit_scale",
        "visual_projection.weight": "visual_projection.weight", "text_projection.weight": "text_projection.weight",
        "text.embeddings.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "text.embeddings.position_embedding.weight": "text_model.embeddings.position_embedding.weight",
        "text.final_norm.weight": "text_model.final_layer_norm.weight",
        "text.final_norm.bias": "text_model.final_layer_norm.bias",
        "vision.embeddings.cls_token": "vision_model.embeddings.class_embedding",
        "vision.embeddings.patch_proj.weight": "vision_model.embeddings.patch_embedding.weight",
        "vision.embeddings.position_embedding.weight": "vision_model.embeddings.position_embedding.weight",
    }
    for ours, theirs in (("embedding_norm", "pre_layrnorm"), ("pooled_norm", "post_layernorm")):
        for kind in ("weight", "bias"):
            names[f"vision.{ours}.{kind}"] = f"vision_model.{theirs}.{kind}"
    names |= _layer_names("text.blocks", "text_model.encoder.layers", pairs, config.text.n_layers)
    return names | _layer_names("vision.blocks", "vision_model.encoder.layers", pairs, config.vision.n_layers)


# ---- both ------------------------------------------------------------------------------------------------------



def read_checkpoint(directory: Path) -> tuple[VisionConfig | CLIPConfig, dict[str, torch.Tensor], str]:
    """(config, our state dict, the weights' file for errors) of a ViT or CLIP checkpoint directory."""
    config_path = directory / CONFIG_FILE
    hf = read_json_object(config_path)
    files = weight_files(directory)
    source = str(files[0] if len(files) == 1 else directory)
    # Buffers some writers saved (position ids) are recomputed, never loaded.
    tensors = {name: t for name, t in read_tensors(files).items() if not name.endswith(".position_ids")}
    if hf.get("model_type") == "clip":
        config = clip_config_from_hf(hf, str(config_path))
        return config, take_tensors(tensors, clip_tensor_names(config), source), source
    if hf.get("model_type") != "vit":
        raise SparkGPTError(f"{config_path}: model_type {hf.get('model_type')!r} is not a vision model; expected "
                            f"one of {', '.join(MODEL_TYPES)}")
    tensors = {name.removeprefix("vit."): t for name, t in tensors.items()}  # a task model's encoder
    config = vit_config_from_hf(hf, str(config_path), pooler="pooler.dense.weight" in tensors)
    state = take_tensors(tensors, vit_tensor_names(config), source)
    for name in ("embeddings.cls_token", "embeddings.position_embedding.weight"):
        if state[name].dim() == 3 and state[name].shape[0] == 1:
            state[name] = state[name].squeeze(0).squeeze(0) if name.endswith("cls_token") else state[name][0]
    return config, state, source


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> ViT | CLIP:
    """Our ViT or CLIP from a transformers checkpoint directory, weights cast to `dtype` on `device`."""
    directory = Path(directory)
    config, state, source = read_checkpoint(directory)
    cls = CLIP if isinstance(config, CLIPConfig) else ViT
    with torch.device("meta"):
        expected = cls(config).state_dict()
    check_shapes(state, expected, source)
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    return cls.from_state_dict(config, state)


def is_vision_model(model: torch.nn.Module) -> bool:
    return isinstance(model, (ViT, CLIP))


def write_model(directory: Path, model: ViT | CLIP) -> None:
    """config.json and model.safetensors that transformers' ViTModel / CLIPModel read."""
    if isinstance(model, CLIP):
        hf_config, names = clip_config_to_hf(model.config), clip_tensor_names(model.config)
    else:
        hf_config, names = vit_config_to_hf(model.config), vit_tensor_names(model.config)
        if model.config.embedding_norm or model.config.pooled_norm or not model.config.final_norm:
            raise SparkGPTError("this vision tower has CLIP's norms; transformers' ViTModel has no place for them")
    state = model.state_dict()
    if isinstance(model, ViT):  # transformers' class token and positions carry leading 1s
        state["embeddings.cls_token"] = state["embeddings.cls_token"][None, None]
        state["embeddings.position_embedding.weight"] = state["embeddings.position_embedding.weight"][None]
    dtype = next(iter(state.values())).dtype
    write_json(directory / CONFIG_FILE, {**hf_config, "dtype": str(dtype).removeprefix("torch.")})
    tensors = {theirs: state[ours].detach().to("cpu").contiguous() for ours, theirs in names.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def read_preprocessing(directory: str | Path) -> ImagePreprocessing:
    """The image processor's settings a ViT or CLIP checkpoint directory carries (preprocessor_config.json), or
    transformers' defaults for its family when it has none."""
    directory = Path(directory)
    kind = checkpoint_kind(directory)
    if kind is None:
        raise SparkGPTError(f"{directory}: not a ViT or CLIP checkpoint (config.json with model_type 'vit' or 'clip')")
    path, defaults = directory / PREPROCESSOR_FILE, CLIP_PREPROCESSING if kind == "clip" else VIT_PREPROCESSING
    if not path.is_file():
        return defaults
    return ImagePreprocessing.from_hf(read_json_object(path), str(path), defaults)


__all__ = ["MODEL_TYPES", "PREPROCESSOR_FILE", "checkpoint_kind", "clip_config_from_hf", "clip_config_to_hf",
           "clip_tensor_names", "is_vision_model", "load_model", "read_checkpoint", "read_preprocessing",
           "vit_config_from_hf", "vit_config_to_hf", "vit_tensor_names", "write_model"]
