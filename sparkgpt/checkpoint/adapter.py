"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, tensors named after the
transformers modules, so `peft.PeftModel.from_pretrained(hf_model, ADAPTER_DIR)` loads ours, and ours load PEFT's.
A family whose modules have no one-to-one transformers name (GPT-2 fuses q, k, v) keeps our names. The LoRA
layers themselves are in `sparkgpt.model.lora`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparkgpt.checkpoint import hf
from sparkgpt.checkpoint.families import family_for
from sparkgpt.checkpoint.registry import resolve
from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object, write_json
from sparkgpt.model.heads import SequenceClassifier
from sparkgpt.model.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _hf_names(config: ModelConfig, modules: list[str]) -> dict[str, str]:
    """Our module path -> transformers' for each of `modules`, when the family has a one-to-one name for every
    one of them (Llama); otherwise ({}) the adapter keeps our names throughout (GPT-2 fuses q, k and v)."""
    family = family_for(config)
    if family is None:
        return {}
    names = {ours.removesuffix(".weight"): theirs.removesuffix(".weight")
             for ours, theirs in family.tensor_names(config).items() if ours.endswith(".weight")}
    return names if all(module in names for module in modules) else {}


def _backbone_prefix(model: nn.Module) -> str:
    """Where the decoder sits in the model: "" for a GPT, "backbone." inside a SequenceClassifier."""
    return "backbone." if hasattr(model, "backbone") else ""


def adapter_names(model: nn.Module) -> dict[str, str]:
    """Our parameter name -> its name in the adapter file, for A, B and the fully trained modules."""
    prefix = _backbone_prefix(model)
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    names = _hf_names(model.config, [name.removeprefix(prefix) for name in adapted])
    mapping = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            inner = name.removeprefix(prefix)
            path = names.get(inner, inner)
            for part in ("lora_A", "lora_B"):
                mapping[f"{name}.{part}.weight"] = f"{_PEFT_PREFIX}{path}.{part}.weight"
    for name, param in model.named_parameters():
        if param.requires_grad and ".lora_" not in name:
            mapping[name] = f"{_PEFT_PREFIX}{name}"
    return mapping


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their names in the adapter file (PEFT's)."""
    params = dict(model.named_parameters())
    return {file_name: params[ours].detach().to("cpu").contiguous() for ours, file_name in adapter_names(model).items()}


def save_adapter(directory: Path, model: nn.Module, lora: LoRAConfig, base_ref: str, task: str = "lm",
                 extra: dict[str, Any] | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `directory` (already staged)."""
    if Path(base_ref).exists():  # a local base: the very checkpoint (a run folder's newest changes), absolute
        base_ref = str(resolve(base_ref).resolve())
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if task == "classify" else "CAUSAL_LM",
        "base_model_name_or_path": base_ref, "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": list(lora.trained_modules) or None, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, **(extra or {}),
    }
    write_json(directory / ADAPTER_CONFIG_FILE, config)
    save_file(adapter_tensors(model), str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG_FILE).is_file()


def read_adapter_config(directory: Path) -> tuple[LoRAConfig, dict[str, Any]]:
    """(the LoRA shape, the whole adapter_config.json) of an adapter folder, checked."""
    path = directory / ADAPTER_CONFIG_FILE
    raw = read_json_object(path)
    if raw.get("peft_type") != "LORA":
        raise SparkGPTError(f"{path}: 'peft_type' is {raw.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("use_dora", "use_rslora"):
        if raw.get(key):
            raise SparkGPTError(f"{path}: {key!r} is set; sparkgpt reads plain LoRA adapters only")
    if raw.get("rank_pattern") or raw.get("alpha_pattern") or raw.get("layers_to_transform"):
        raise SparkGPTError(f"{path}: per-layer rank/alpha patterns are not supported")
    targets = raw.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise SparkGPTError(f"{path}: 'target_modules' must be a list of module names")
    try:
        lora = LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                          dropout=float(raw.get("lora_dropout") or 0.0), targets=tuple(targets),
                          trained_modules=tuple(raw.get("modules_to_save") or ()))
    except (KeyError, TypeError, ValueError):
        raise SparkGPTError(f"{path}: expected numeric 'r' and 'lora_alpha'") from None
    lora.validate()
    return lora, raw


def load_adapter(model: nn.Module, directory: Path) -> None:
    """Wrap `model` as the adapter folder describes and load its tensors into place."""
    apply_lora(model, read_adapter_config(directory)[0])
    load_adapter_weights(model, directory)


def load_adapter_weights(model: nn.Module, directory: Path) -> None:
    """Copy an adapter's tensors into a model already wrapped for it (every one must be used, every A and B found)."""
    weights = directory / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise SparkGPTError(f"{weights}: missing (an adapter folder holds {ADAPTER_CONFIG_FILE} and "
                            f"{ADAPTER_WEIGHTS_FILE})")
    tensors = hf.read_tensors([weights])
    # PEFT may store the adapter name inside the key (".lora_A.default.weight"); the saved form has none.
    tensors = {name.replace(".default.", "."): t for name, t in tensors.items()}
    hf.check_shapes(tensors, adapter_tensors(model), str(weights))
    ours = {file_name: name for name, file_name in adapter_names(model).items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for file_name, tensor in tensors.items():
            param = params[ours[file_name]]
            param.copy_(tensor.to(param.dtype))


def base_reference(directory: Path) -> str:
    """The base model an adapter folder names (base_model_name_or_path)."""
    base = read_json_object(directory / ADAPTER_CONFIG_FILE).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise SparkGPTError(f"{directory / ADAPTER_CONFIG_FILE}: no 'base_model_name_or_path' naming the base model")
    return base


def attach_adapter(model: nn.Module, directory: Path, merge: bool = True) -> nn.Module:
    """`model` with the adapter folder's LoRA applied (and a classification head when the adapter carries one),
    merged into plain linear layers with `merge`; ready for inference."""
    _, raw = read_adapter_config(directory)
    if raw.get("task_type") == "SEQ_CLS":
        model = SequenceClassifier(model, _adapter_labels(directory, raw))
    load_adapter(model, directory)
    if merge:
        merge_lora(model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def _adapter_labels(directory: Path, raw: dict[str, Any]) -> list[str]:
    """A classification adapter's label names: ours saves them; PEFT's has only the head, so LABEL_0, LABEL_1, ...
    (transformers' default names) as many as the head's rows."""
    labels = raw.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise SparkGPTError(f"{directory / ADAPTER_CONFIG_FILE}: 'labels' must be a list of at least 2 names")
        return labels
    heads = [t for name, t in hf.read_tensors([directory / ADAPTER_WEIGHTS_FILE]).items()
             if name.endswith("score.weight")]
    if len(heads) != 1:
        raise SparkGPTError(f"{directory}: a classification adapter needs its head (score.weight) or 'labels'")
    return [f"LABEL_{index}" for index in range(heads[0].shape[0])]
