"""Hugging Face checkpoint directories, both ways: config.json + model.safetensors (sharded too) <-> our model.

The families (tensor-name tables and config translations) are in `families.py`.
Weights are read with safetensors only: a pickle file is never unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sparkgpt.checkpoint.families import FAMILIES, GENERIC_KEYS, Family, family_for
from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object, write_json
from sparkgpt.model.heads import SequenceClassifier
from sparkgpt.model.transformer import model_class

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SCORE_WEIGHT = "score.weight"  # a sequence-classification head (transformers' name)

# ---- reading ----------------------------------------------------------------------------------------------

def read_config(directory: Path) -> tuple[ModelConfig, Family | None]:
    """The ModelConfig a checkpoint directory describes (a transformers family, or our own `sparkgpt` type)."""
    path = directory / CONFIG_FILE
    hf = read_json_object(path)
    model_type = hf.get("model_type")
    if model_type == "sparkgpt":
        fields = {k: v for k, v in hf.items() if k not in GENERIC_KEYS}
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
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied head some writers store anyway; it is the embedding
    return ours | take_tensors(tensors, family.tensor_names(config), source)


def take_tensors(tensors: dict[str, torch.Tensor], names: dict[str, str], source: str) -> dict[str, torch.Tensor]:
    """The tensors `names` maps (our name -> theirs) moved out of `tensors` under our names; a missing tensor, or
    one left over, is a one-line error naming it and `source`."""
    ours, missing = {}, []
    for our_name, their_name in names.items():
        if their_name in tensors:
            ours[our_name] = tensors.pop(their_name)
        else:
            missing.append(their_name)
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
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "decoder_start_token_id": config.decoder_start_token_id}
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
    directory = Path(directory)
    if "quantization_config" in read_json_object(directory / CONFIG_FILE):
        raise SparkGPTError(f"{directory / CONFIG_FILE}: a quantised checkpoint; load it with sparkgpt.load "
                            "(sparkgpt.checkpoint.load), which reads every format")
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
