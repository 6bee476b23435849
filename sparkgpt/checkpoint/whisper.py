"""Whisper checkpoints onto our Whisper model: transformers' `WhisperForConditionalGeneration` directories (the
hub's `openai/whisper-*`, safetensors) and CTranslate2 folders (faster-whisper's model.bin + config.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparkgpt.checkpoint import ctranslate2
from sparkgpt.checkpoint.hf import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    check_shapes,
    read_tensors,
    take_tensors,
    weight_files,
)
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object
from sparkgpt.model.whisper import Whisper, WhisperConfig, whisper_config
from sparkgpt.tokenizer import TOKENIZER_FILE, Tokenizer

SPECIAL_TOKENS = ("<|startoftranscript|>", "<|endoftext|>")


def checkpoint_kind(directory: Path) -> str | None:
    """"transformers" or "ctranslate2" for a Whisper checkpoint directory, else None."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        return None
    config = read_json_object(config_path)
    if config.get("model_type") == "whisper":
        return "transformers"
    if "model_type" not in config and (directory / ctranslate2.MODEL_FILE).is_file():
        return "ctranslate2"
    return None


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Whisper:
    """Our Whisper from either kind of checkpoint directory, weights cast to `dtype` on `device`."""
    directory = Path(directory)
    kind = checkpoint_kind(directory)
    if kind == "transformers":
        config, state, source = read_transformers(directory)
    elif kind == "ctranslate2":
        config, state, source = read_ctranslate2_dir(directory)
    else:
        raise SparkGPTError(f"{directory}: not a Whisper checkpoint (transformers' config.json with model_type "
                            "'whisper', or CTranslate2's model.bin)")
    with torch.device("meta"):
        expected = Whisper(config).state_dict()
    expected.pop("lm_head.weight")
    check_shapes(state, expected, source)
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    return Whisper.from_state_dict(config, state)


def _token_ids(directory: Path) -> dict[str, int | None]:
    if not (directory / TOKENIZER_FILE).is_file():
        return {}
    tokenizer = Tokenizer.from_dir(directory)
    return {name: tokenizer.token_to_id(name) for name in SPECIAL_TOKENS}


def read_ctranslate2_dir(directory: Path) -> tuple[WhisperConfig, dict[str, torch.Tensor], str]:
    file = ctranslate2.read_ctranslate2(directory / ctranslate2.MODEL_FILE)
    config = ctranslate2.whisper_config_from_ctranslate2(file, read_json_object(directory / CONFIG_FILE),
                                                         _token_ids(directory))
    return config, ctranslate2.whisper_state_dict(file, config), str(file.path)


# ---- transformers' WhisperForConditionalGeneration ----------------------------------------------------------

def whisper_config_from_hf(hf: dict[str, Any], generation: dict[str, Any], source: str) -> WhisperConfig:
    """Our config from transformers' config.json (and generation_config.json's suppressed tokens). Only the fields
    that change the inference math are checked; dropout and SpecAugment settings are training's."""
    checks = {"activation_function": ("gelu",), "scale_embedding": (False,)}
    for name, allowed in checks.items():
        value = hf.get(name, allowed[0])
        if value not in allowed:
            raise SparkGPTError(f"{source}: field {name!r} is {value!r}; supported: {', '.join(map(repr, allowed))}")
    for ours, pair in (("heads", ("encoder_attention_heads", "decoder_attention_heads")),
                       ("FFN widths", ("encoder_ffn_dim", "decoder_ffn_dim"))):
        if hf.get(pair[0]) != hf.get(pair[1]):
            raise SparkGPTError(f"{source}: encoder and decoder {ours} differ ({pair[0]} {hf.get(pair[0])}, "
                                f"{pair[1]} {hf.get(pair[1])}); sparkgpt's Whisper shares one")
    tokens = {name: generation.get(name, hf.get(name)) for name in ("suppress_tokens", "begin_suppress_tokens")}
    try:
        return whisper_config(
            vocab_size=hf.get("vocab_size", 51865), d_model=hf.get("d_model", 1280),
            n_heads=hf.get("decoder_attention_heads", 20), n_layers=hf.get("decoder_layers", 32),
            n_encoder_layers=hf.get("encoder_layers", 32), d_ff=hf.get("decoder_ffn_dim", 5120),
            max_seq_len=hf.get("max_target_positions", 448), n_audio_ctx=hf.get("max_source_positions", 1500),
            n_mels=hf.get("num_mel_bins", 80), suppress_tokens=list(tokens["suppress_tokens"] or []),
            begin_suppress_tokens=list(tokens["begin_suppress_tokens"] or []),
            bos_token_id=hf.get("decoder_start_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
    except SparkGPTError as error:
        raise SparkGPTError(f"{source}: {error}") from None


def whisper_hf_tensor_names(config: WhisperConfig) -> dict[str, str]:
    """Our name -> transformers' (without the `model.` of WhisperForConditionalGeneration). Their key projections
    have no bias: ours gets zeros, which attention ignores."""
    names = {
        "conv1.weight": "encoder.conv1.weight", "conv1.bias": "encoder.conv1.bias",
        "conv2.weight": "encoder.conv2.weight", "conv2.bias": "encoder.conv2.bias",
        "audio_positions": "encoder.embed_positions.weight",
        "encoder_norm.weight": "encoder.layer_norm.weight", "encoder_norm.bias": "encoder.layer_norm.bias",
        "embeddings.token_embedding.weight": "decoder.embed_tokens.weight",
        "embeddings.position_embedding.weight": "decoder.embed_positions.weight",
        "final_norm.weight": "decoder.layer_norm.weight", "final_norm.bias": "decoder.layer_norm.bias",
    }
    layer = [("attn_norm", "self_attn_layer_norm"), ("attn.q_proj", "self_attn.q_proj"),
             ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.out_proj"),
             ("ffn_norm", "final_layer_norm"), ("ffn.up_proj", "fc1"), ("ffn.down_proj", "fc2")]
    cross = [("cross_norm", "encoder_attn_layer_norm"), ("cross_attn.q_proj", "encoder_attn.q_proj"),
             ("cross_attn.v_proj", "encoder_attn.v_proj"), ("cross_attn.o_proj", "encoder_attn.out_proj")]
    for stack, ours_prefix, count, pairs in (("encoder", "encoder_blocks", config.n_encoder_layers, layer),
                                             ("decoder", "blocks", config.n_layers, layer + cross)):
        for i in range(count):
            for ours, theirs in pairs:
                for kind in ("weight", "bias"):
                    names[f"{ours_prefix}.{i}.{ours}.{kind}"] = f"{stack}.layers.{i}.{theirs}.{kind}"
            for ours, theirs in [("attn", "self_attn")] + ([("cross_attn", "encoder_attn")] if stack == "decoder"
                                                            else []):
                names[f"{ours_prefix}.{i}.{ours}.k_proj.weight"] = f"{stack}.layers.{i}.{theirs}.k_proj.weight"
    return names


def read_transformers(directory: Path) -> tuple[WhisperConfig, dict[str, torch.Tensor], str]:
    config_path = directory / CONFIG_FILE
    generation_path = directory / GENERATION_CONFIG_FILE
    generation = read_json_object(generation_path) if generation_path.is_file() else {}
    config = whisper_config_from_hf(read_json_object(config_path), generation, str(config_path))
    files = weight_files(directory)
    source = str(files[0] if len(files) == 1 else directory)
    tensors = {name.removeprefix("model."): t for name, t in read_tensors(files).items()}
    projection = tensors.pop("proj_out.weight", None)  # tied: the token embedding
    embedding = tensors.get("decoder.embed_tokens.weight")
    if projection is not None and embedding is not None and not torch.equal(projection, embedding):
        raise SparkGPTError(f"{source}: proj_out.weight differs from decoder.embed_tokens.weight; sparkgpt's Whisper "
                            "ties them")
    state = take_tensors(tensors, whisper_hf_tensor_names(config), source)
    for name in [n for n in state if n.endswith("k_proj.weight")]:
        weight = state[name]
        state[name.removesuffix("weight") + "bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return config, state, source
