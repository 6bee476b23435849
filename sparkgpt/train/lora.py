"""LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank updates of chosen linear layers.

A targeted layer y = W x becomes y = W x + (α / r) · B A x, with A [r, in] and B [out, r]; only A and B train.
B starts at zero, so at initialisation the adapted model computes exactly what the base model does. Merging
writes W' = W + (α / r) · B A back into a plain linear layer: the same outputs, no extra cost at inference.

Adapters are saved on their own in PEFT's format (adapter_config.json + adapter_model.safetensors, tensors named
after the transformers modules), so `peft.PeftModel.from_pretrained(hf_model, ADAPTER_DIR)` loads ours, and ours
load PEFT's. A family whose modules have no one-to-one transformers name (GPT-2 fuses q, k, v) keeps our names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparkgpt.checkpoint import hf
from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object, write_json

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS   # leaf module names (q_proj, up_proj, ...)
    trained_modules: tuple[str, ...] = field(default=())  # trained in full and saved with the adapter (a head)

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SparkGPTError(f"config key 'lora_rank' is {self.rank!r}; expected a positive integer")
        if not self.alpha > 0:
            raise SparkGPTError(f"config key 'lora_alpha' is {self.alpha!r}; expected a positive number")
        if not 0 <= self.dropout < 1:
            raise SparkGPTError(f"config key 'lora_dropout' is {self.dropout!r}; expected a number in [0, 1)")
        if not self.targets:
            raise SparkGPTError("config key 'lora_targets' is empty; expected module names such as q_proj,v_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer `base` plus the trainable low-rank update (α / r) · B A."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init for A
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_dtype = self.base.weight.dtype
        y = self.base(x if x.dtype == base_dtype or torch.is_autocast_enabled() else x.to(base_dtype))
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)  # the base's dtype flows on (bf16 keys meet bf16 queries)

    def merged(self) -> nn.Linear:
        """A plain linear layer computing base + update (in the base weight's dtype)."""
        weight = self.base.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            merged.weight.copy_((weight.float() + delta).to(weight.dtype))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter, wrap each linear layer whose leaf name is a target, unfreeze `trained_modules`.
    Returns the wrapped module names; an unknown target is an error naming the layers there are."""
    config.validate()
    for param in model.parameters():
        param.requires_grad_(False)
    # The output head is never adapted (a vocabulary-sized update; a classifier does not even use it).
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.rpartition(".")[2] != "lm_head"}
    wrapped = [name for name in layers if name.rpartition(".")[2] in config.targets]
    missing = [t for t in config.targets if t not in {name.rpartition(".")[2] for name in wrapped}]
    if missing:
        known = sorted({name.rpartition(".")[2] for name in layers})
        raise SparkGPTError(f"config key 'lora_targets': no linear layer named {', '.join(missing)} in this model "
                            f"(its linear layers: {', '.join(known)})")
    for name in wrapped:
        _set_module(model, name, LoRALinear(layers[name], config.rank, config.alpha, config.dropout))
    for name in config.trained_modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SparkGPTError(f"adapter module to train in full {name!r} is not in this model") from None
        for param in module.parameters():
            param.requires_grad_(True)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged linear layer, in place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_module(model, name, module.merged())
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- saving and loading adapters (PEFT's format) ---------------------------------------------------------------

def _hf_names(config: ModelConfig, modules: list[str]) -> dict[str, str]:
    """Our module path -> transformers' for each of `modules`, when the family has a one-to-one name for every
    one of them (Llama); otherwise ({}) the adapter keeps our names throughout (GPT-2 fuses q, k and v)."""
    family = hf.family_for(config)
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
        from sparkgpt.checkpoint.registry import resolve

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


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(module, LoRALinear) for module in model.modules())


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
    from sparkgpt.model.heads import SequenceClassifier

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
