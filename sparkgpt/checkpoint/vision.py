"""transformers' ViT, CLIP and image-to-text checkpoints (`ViTModel`, `ViTForImageClassification`'s encoder,
`CLIPModel`, `VisionEncoderDecoderModel` of a ViT and a GPT-2: save_pretrained folders, safetensors), both ways, onto
`sparkgpt.model.vision`, and their image processors' settings (preprocessor_config.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparkgpt.checkpoint.families import FAMILIES, GENERIC_KEYS
from sparkgpt.checkpoint.hf import CONFIG_FILE, WEIGHTS_FILE, check_shapes, read_tensors, take_tensors, weight_files
from sparkgpt.config import ImageTextConfig, ModelConfig
from sparkgpt.data.images import CLIP_PREPROCESSING, VIT_PREPROCESSING, ImagePreprocessing, vit_preprocessing
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object, write_json
from sparkgpt.model.vision import CLIP, CLIPConfig, ImageText, VisionConfig, ViT, vision_config

PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGE_TEXT_TYPE = "vision-encoder-decoder"
MODEL_TYPES = ("vit", "clip", IMAGE_TEXT_TYPE)

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
    """"vit", "clip" or "vision-encoder-decoder" for such a transformers checkpoint directory, else None."""
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


# ---- image-to-text: a ViT encoder and a GPT-2 decoder (VisionEncoderDecoderModel) ----------------------------

GPT2 = FAMILIES["gpt2"]
_IMAGE_TEXT_KEYS = {"encoder", "decoder", "eos_token_id"}
# What our image-to-text model's two stacks share: (our field, ViT's name, GPT-2's name).
_SHARED = (("d_model", "hidden_size", "n_embd"), ("n_heads", "num_attention_heads", "n_head"),
           ("d_ff", "intermediate_size", "n_inner"), ("norm_eps", "layer_norm_eps", "layer_norm_epsilon"))
# The block fields an encoder tower takes from the image-to-text config.
_BLOCK_FIELDS = ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "ffn", "norm", "norm_eps", "bias",
                 "qkv_bias", "qk_norm", "sandwich_norm", "attention_scale", "attn_logit_softcap", "n_experts",
                 "initializer_range")
# Generation defaults and bookkeeping older writers put into the decoder's config; GPT-2's own fields stay.
_DECODER_IGNORED = LEGACY_KEYS - {"tie_word_embeddings", "bos_token_id"}
# GPT-2's attention-mask buffers, which older writers saved for its cross-attention too.
_DECODER_BUFFERS = (*GPT2.ignored_tensors, ".crossattention.bias", ".crossattention.masked_bias")


def _sub_model(hf: dict[str, Any], name: str, model_type: str, source: str) -> dict[str, Any]:
    value = hf.get(name)
    if not isinstance(value, dict):
        raise SparkGPTError(f"{source}: field {name!r} must be an object (a {model_type} config)")
    if value.get("model_type") != model_type:
        raise SparkGPTError(f"{source}: field '{name}.model_type' is {value.get('model_type')!r}; supported: "
                            f"{model_type!r}")
    return value


def image_text_config_from_hf(hf: dict[str, Any], source: str) -> ImageTextConfig:
    """Our config from a VisionEncoderDecoderModel's config.json: a ViT encoder and a GPT-2 decoder of one width,
    head count, FFN, activation and norm epsilon, which our model's two stacks share."""
    _check_keys(hf, _IMAGE_TEXT_KEYS, source)
    encoder, decoder = _sub_model(hf, "encoder", "vit", source), _sub_model(hf, "decoder", "gpt2", source)
    # Old writers copied every token id into each sub-config; an encoder reads none.
    vit = vit_config_from_hf({k: v for k, v in encoder.items() if k != "eos_token_id"}, f"{source} (encoder)",
                             pooler=False)
    decoder_source = f"{source} (decoder)"
    _choose(decoder, "add_cross_attention", False, (True,), decoder_source)
    gpt2 = GPT2.config_from_hf({k: v for k, v in decoder.items() if k not in _DECODER_IGNORED}, decoder_source)
    top = {k: hf[k] for k in ("decoder_start_token_id", "pad_token_id", "eos_token_id") if hf.get(k) is not None}
    config = _built(lambda: ImageTextConfig.from_dict({
        **gpt2, "architecture": "encoder-decoder", "n_encoder_layers": vit.n_layers, "image_size": vit.image_size,
        "patch_size": vit.patch_size, "num_channels": vit.num_channels, "pad_token_id": decoder.get("pad_token_id"),
        **top}, source="image-to-text config"), source)
    for field, vit_name, gpt2_name in _SHARED:
        if getattr(vit, field) != getattr(config, field):
            raise SparkGPTError(f"{source}: field 'encoder.{vit_name}' ({getattr(vit, field)}) differs from "
                                f"'decoder.{gpt2_name}' ({getattr(config, field)}); the two stacks share it")
    if vit.ffn != "gelu":
        raise SparkGPTError(f"{source}: field 'encoder.hidden_act' is {encoder.get('hidden_act', 'gelu')!r}; the "
                            "stacks share the GPT-2 decoder's tanh GELU: supported 'gelu_new', 'gelu_pytorch_tanh'")
    if vit.qkv_bias is False:
        raise SparkGPTError(f"{source}: field 'encoder.qkv_bias' is false; the stacks share GPT-2's biases")
    cross_width = decoder.get("cross_attention_hidden_size")
    if cross_width not in (None, config.d_model):
        raise SparkGPTError(f"{source}: field 'decoder.cross_attention_hidden_size' is {cross_width!r}; the stacks "
                            f"share one width ({config.d_model})")
    return config


def _encoder_tower(config: ImageTextConfig) -> VisionConfig:
    """The ViT an image-to-text model's encoder is: the shared blocks, the image front end, ViT's final norm."""
    return _built(lambda: vision_config(
        **{field: getattr(config, field) for field in _BLOCK_FIELDS}, n_layers=config.n_encoder_layers,
        image_size=config.image_size, patch_size=config.patch_size, num_channels=config.num_channels,
        final_norm=True, embedding_norm=False, patch_bias=True, pooled_norm=False, pooler_size=None,
    ), "image-to-text encoder")


def image_text_config_to_hf(config: ImageTextConfig) -> dict[str, Any]:
    gpt2_like = config.ffn == "gelu" and config.positions == "learned" and config.norm_position == "pre" \
        and config.final_norm and config.qkv_bias is not False and not config.scale_embeddings \
        and not config.embedding_norm and not config.scale_decoder_output and not config.type_vocab_size \
        and config.final_logit_softcap is None
    if not gpt2_like:
        raise SparkGPTError("this image-to-text model differs from a ViT and a GPT-2 (tanh GELU, learned positions, "
                            "pre-norm blocks with biases and final norms, plain embeddings and head), which "
                            "transformers' VisionEncoderDecoderModel cannot say")
    decoder = dict(GPT2.config_to_hf(config), architectures=[GPT2.architecture], model_type=GPT2.model_type,
                   add_cross_attention=True, is_decoder=True, pad_token_id=config.pad_token_id)
    # tie_word_embeddings false is transformers' own value here (encoder and decoder share nothing); whether the
    # decoder's head is its token embedding is the decoder config's.
    return dict(architectures=["VisionEncoderDecoderModel"], model_type=IMAGE_TEXT_TYPE, is_encoder_decoder=True,
                tie_word_embeddings=False, encoder=vit_config_to_hf(_encoder_tower(config)), decoder=decoder,
                decoder_start_token_id=config.decoder_start_token_id, pad_token_id=config.pad_token_id,
                eos_token_id=config.eos_token_id)


def image_text_tensor_names(config: ImageTextConfig) -> dict[str, str]:
    """Our name -> transformers' on disk of the tensors taken whole (GPT-2's Conv1D weights transposed): the ViT's
    under `encoder.`, GPT-2's under `decoder.`. The fused attention projections are `_decoder_to_ours`'."""
    renamed = {"embeddings.": "patch_embeddings.", "final_norm.": "encoder_norm.", "blocks.": "encoder_blocks."}
    names = {}
    for ours, theirs in vit_tensor_names(_encoder_tower(config)).items():
        prefix = next(p for p in renamed if ours.startswith(p))
        names[renamed[prefix] + ours.removeprefix(prefix)] = f"encoder.{theirs}"
    for ours, theirs in GPT2.tensor_names(config).items():
        names[("embeddings." if ours.endswith("_embedding.weight") else "") + ours] = f"decoder.{theirs}"
    cross = [("cross_norm", "ln_cross_attn"), ("cross_attn.o_proj", "crossattention.c_proj")]
    return names | _layer_names("blocks", "decoder.transformer.h", cross, config.n_layers)


def _decoder_to_ours(tensors: dict[str, torch.Tensor], config: ImageTextConfig) -> dict[str, torch.Tensor]:
    """The decoder's fused projections split (self-attention's q/k/v; cross-attention's queries `q_attn` and keys
    then values `c_attn`) and its other Conv1D weights ([in, out]) transposed in place. `tensors`: the decoder's,
    without their `decoder.` prefix."""
    ours = GPT2.to_ours(tensors, config)
    for i in range(config.n_layers):
        theirs, block = f"transformer.h.{i}.crossattention.", f"blocks.{i}.cross_attn."
        ours[block + "q_proj.weight"] = tensors.pop(theirs + "q_attn.weight").t()
        ours[block + "q_proj.bias"] = tensors.pop(theirs + "q_attn.bias")
        keys_values = zip(("k_proj", "v_proj"), tensors.pop(theirs + "c_attn.weight").t().chunk(2),
                          tensors.pop(theirs + "c_attn.bias").chunk(2), strict=True)
        for name, weight, bias in keys_values:
            ours[f"{block}{name}.weight"], ours[f"{block}{name}.bias"] = weight, bias
        tensors[theirs + "c_proj.weight"] = tensors[theirs + "c_proj.weight"].t()
    return ours


def _decoder_to_theirs(state: dict[str, torch.Tensor], config: ImageTextConfig) -> dict[str, torch.Tensor]:
    """`_decoder_to_ours` reversed: the fused projections under their names, popped from `state`."""
    theirs = GPT2.to_theirs(state, config)
    for i in range(config.n_layers):
        layer, block = f"transformer.h.{i}.crossattention.", f"blocks.{i}.cross_attn."
        theirs[layer + "q_attn.weight"] = state.pop(block + "q_proj.weight").t()
        theirs[layer + "q_attn.bias"] = state.pop(block + "q_proj.bias")
        theirs[layer + "c_attn.weight"] = torch.cat([state.pop(f"{block}{n}_proj.weight") for n in "kv"]).t()
        theirs[layer + "c_attn.bias"] = torch.cat([state.pop(f"{block}{n}_proj.bias") for n in "kv"])
        state[block + "o_proj.weight"] = state[block + "o_proj.weight"].t()
    return {f"decoder.{name}": tensor for name, tensor in theirs.items()}


def _read_image_text(hf: dict[str, Any], config_path: Path, tensors: dict[str, torch.Tensor],
                     source: str) -> tuple[ImageTextConfig, dict[str, torch.Tensor]]:
    config = image_text_config_from_hf(hf, str(config_path))
    if any(name.startswith("enc_to_dec_proj.") for name in tensors):
        raise SparkGPTError(f"{source}: tensor 'enc_to_dec_proj' (between two widths) is not supported; the two "
                            "stacks share one width")
    decoder = {name.removeprefix("decoder."): tensors.pop(name) for name in list(tensors)
               if name.startswith("decoder.")}
    decoder = {name: t for name, t in decoder.items() if not name.endswith(_DECODER_BUFFERS)}
    if config.tie_embeddings:
        decoder.pop("lm_head.weight", None)  # a tied head some writers store anyway; it is the embedding
    # ViTModel's pooler, which transformers saves though the decoder never reads it.
    tensors = {name: t for name, t in tensors.items() if not name.startswith("encoder.pooler.")}
    try:
        ours = _decoder_to_ours(decoder, config)
    except KeyError as missing:
        raise SparkGPTError(f"{source}: missing tensor decoder.{missing.args[0]}") from None
    tensors |= {f"decoder.{name}": t for name, t in decoder.items()}
    state = ours | take_tensors(tensors, image_text_tensor_names(config), source)
    _unbatched(state, "patch_embeddings.")
    return config, state


def _check_size(preprocessing: ImagePreprocessing, config: ImageTextConfig, source: str) -> None:
    """The settings must make every image the model's image_size square: by a crop, or by a resize without one."""
    square = (config.image_size, config.image_size)
    made = preprocessing.crop if preprocessing.crop is not None else preprocessing.size
    if made != square:
        field = "crop_size" if preprocessing.crop is not None else "size"
        raise SparkGPTError(f"{source}: field {field!r} makes images of {made}; the model reads {square[0]} × "
                            f"{square[1]} images (its image_size)")


def _image_text_preprocessing(directory: Path, config: ImageTextConfig) -> ImagePreprocessing:
    """The checkpoint's preprocessor_config.json, or ViT's defaults at the model's image size."""
    path, defaults = directory / PREPROCESSOR_FILE, vit_preprocessing(config.image_size)
    if not path.is_file():
        return defaults
    preprocessing = ImagePreprocessing.from_hf(read_json_object(path), str(path), defaults)
    _check_size(preprocessing, config, str(path))
    return preprocessing


def _preprocessing_to_hf(preprocessing: ImagePreprocessing, config: ImageTextConfig) -> dict[str, Any]:
    """ViTImageProcessor's preprocessor_config.json for the settings an image-to-text model reads images with."""
    _check_size(preprocessing, config, "the model's preprocessing")
    if preprocessing.crop is not None:
        raise SparkGPTError("the model's preprocessing crops its images, which transformers' ViTImageProcessor "
                            "cannot")
    rescale, mean, std = preprocessing.rescale, preprocessing.mean, preprocessing.std
    return dict(image_processor_type="ViTImageProcessor", do_resize=preprocessing.size is not None,
                size={"height": config.image_size, "width": config.image_size}, resample=int(preprocessing.resample),
                do_rescale=rescale is not None, rescale_factor=1 / 255 if rescale is None else rescale,
                do_normalize=mean is not None, image_mean=list(mean or VIT_PREPROCESSING.mean),
                image_std=list(std or VIT_PREPROCESSING.std))


# ---- all ------------------------------------------------------------------------------------------------------

def _unbatched(state: dict[str, torch.Tensor], prefix: str) -> None:
    """transformers' class token [1, 1, d] and positions [1, N, d] as ours, [d] and [N, d], in place."""
    for name in (f"{prefix}cls_token", f"{prefix}position_embedding.weight"):
        if state[name].dim() == 3 and state[name].shape[0] == 1:
            state[name] = state[name].squeeze(0).squeeze(0) if name.endswith("cls_token") else state[name][0]


def _batched(state: dict[str, torch.Tensor], prefix: str) -> None:
    """`_unbatched` reversed: the leading 1s transformers' class token and positions carry."""
    state[f"{prefix}cls_token"] = state[f"{prefix}cls_token"][None, None]
    state[f"{prefix}position_embedding.weight"] = state[f"{prefix}position_embedding.weight"][None]


def read_checkpoint(
    directory: Path,
) -> tuple[VisionConfig | CLIPConfig | ImageTextConfig, dict[str, torch.Tensor], str]:
    """(config, our state dict, the weights' file for errors) of a ViT, CLIP or image-to-text checkpoint
    directory."""
    config_path = directory / CONFIG_FILE
    hf = read_json_object(config_path)
    files = weight_files(directory)
    source = str(files[0] if len(files) == 1 else directory)
    # Buffers some writers saved (position ids) are recomputed, never loaded.
    tensors = {name: t for name, t in read_tensors(files).items() if not name.endswith(".position_ids")}
    if hf.get("model_type") == "clip":
        config = clip_config_from_hf(hf, str(config_path))
        return config, take_tensors(tensors, clip_tensor_names(config), source), source
    if hf.get("model_type") == IMAGE_TEXT_TYPE:
        return (*_read_image_text(hf, config_path, tensors, source), source)
    if hf.get("model_type") != "vit":
        raise SparkGPTError(f"{config_path}: model_type {hf.get('model_type')!r} is not a vision model; expected "
                            f"one of {', '.join(MODEL_TYPES)}")
    tensors = {name.removeprefix("vit."): t for name, t in tensors.items()}  # a task model's encoder
    config = vit_config_from_hf(hf, str(config_path), pooler="pooler.dense.weight" in tensors)
    state = take_tensors(tensors, vit_tensor_names(config), source)
    _unbatched(state, "embeddings.")
    return config, state, source


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> ViT | CLIP | ImageText:
    """Our ViT, CLIP or ImageText from a transformers checkpoint directory, weights cast to `dtype` on `device`; an
    ImageText with the image processor's settings the directory carries."""
    directory = Path(directory)
    config, state, source = read_checkpoint(directory)
    cls = CLIP if isinstance(config, CLIPConfig) else ImageText if isinstance(config, ImageTextConfig) else ViT
    with torch.device("meta"):
        expected = cls(config).state_dict()
    if isinstance(config, ImageTextConfig) and config.tie_embeddings:
        expected.pop("lm_head.weight")  # the token embedding, which from_state_dict ties it to
    check_shapes(state, expected, source)
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    model = cls.from_state_dict(config, state)
    if isinstance(model, ImageText):
        model.preprocessing = _image_text_preprocessing(directory, model.config)
    return model


def is_vision_model(model: torch.nn.Module) -> bool:
    return isinstance(model, (ViT, CLIP, ImageText))


def write_model(directory: Path, model: ViT | CLIP | ImageText) -> None:
    """config.json and model.safetensors that transformers' ViTModel / CLIPModel / VisionEncoderDecoderModel read;
    an ImageText's image processor's settings too (preprocessor_config.json)."""
    state, tensors = model.state_dict(), {}
    if isinstance(model, ImageText):
        config = model.config
        hf_config, names = image_text_config_to_hf(config), image_text_tensor_names(config)
        if config.tie_embeddings:
            state.pop("lm_head.weight")  # one matrix, stored once (as transformers does)
        _batched(state, "patch_embeddings.")
        tensors = _decoder_to_theirs(state, config)
        write_json(directory / PREPROCESSOR_FILE, _preprocessing_to_hf(model.preprocessing, config))
    elif isinstance(model, CLIP):
        hf_config, names = clip_config_to_hf(model.config), clip_tensor_names(model.config)
    else:
        hf_config, names = vit_config_to_hf(model.config), vit_tensor_names(model.config)
        if model.config.embedding_norm or model.config.pooled_norm or not model.config.final_norm:
            raise SparkGPTError("this vision tower has CLIP's norms; transformers' ViTModel has no place for them")
        _batched(state, "embeddings.")
    dtype = next(iter(state.values())).dtype
    write_json(directory / CONFIG_FILE, {**hf_config, "dtype": str(dtype).removeprefix("torch.")})
    tensors |= {theirs: state[ours] for ours, theirs in names.items()}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def read_preprocessing(directory: str | Path) -> ImagePreprocessing:
    """The image processor's settings a ViT, CLIP or image-to-text checkpoint directory carries
    (preprocessor_config.json), or transformers' defaults for its family (at an image-to-text model's size) when it
    has none."""
    directory = Path(directory)
    kind = checkpoint_kind(directory)
    if kind is None:
        raise SparkGPTError(f"{directory}: not a ViT, CLIP or image-to-text checkpoint (config.json with model_type "
                            f"{', '.join(map(repr, MODEL_TYPES))})")
    if kind == IMAGE_TEXT_TYPE:
        config_path = directory / CONFIG_FILE
        config = image_text_config_from_hf(read_json_object(config_path), str(config_path))
        return _image_text_preprocessing(directory, config)
    path, defaults = directory / PREPROCESSOR_FILE, CLIP_PREPROCESSING if kind == "clip" else VIT_PREPROCESSING
    if not path.is_file():
        return defaults
    return ImagePreprocessing.from_hf(read_json_object(path), str(path), defaults)


__all__ = ["IMAGE_TEXT_TYPE", "MODEL_TYPES", "PREPROCESSOR_FILE", "checkpoint_kind", "clip_config_from_hf",
           "clip_config_to_hf", "clip_tensor_names", "image_text_config_from_hf", "image_text_config_to_hf",
           "image_text_tensor_names", "is_vision_model", "load_model", "read_checkpoint", "read_preprocessing",
           "vit_config_from_hf", "vit_config_to_hf", "vit_tensor_names", "write_model"]
