"""The quantised checkpoint format: an HF-style directory whose config.json names our method
(`quantization_config`), with the integers and scales in model.safetensors under our own tensor names.
The layers themselves are in `sparkgpt.model.quant`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparkgpt.checkpoint import hf
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import read_json_object, write_json
from sparkgpt.model.quant import GROUP_SIZE, METHODS, float_tensors_to, quantize_skeleton
from sparkgpt.model.transformer import GPT

QUANT_METHOD = "sparkgpt"  # quantization_config.quant_method of our checkpoints (transformers refuses it clearly)


def quantization_config(model: nn.Module) -> dict[str, Any]:
    return {"quant_method": QUANT_METHOD, **model.quantization, "head": "int8"}


def read_quantization(hf_config: dict[str, Any], source: str) -> tuple[str, int, list[str]] | None:
    """(method, group size, layers kept int8 under int4) from a config.json's quantization_config, None if it has
    none."""
    spec = hf_config.get("quantization_config")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("quant_method") != QUANT_METHOD:
        found = spec.get("quant_method") if isinstance(spec, dict) else spec
        raise SparkGPTError(f"{source}: quantization_config.quant_method {found!r} is not supported; expected "
                            f"{QUANT_METHOD!r} (a checkpoint written by `sparkgpt quantize`)")
    method, group_size = spec.get("method"), spec.get("group_size", GROUP_SIZE)
    if method not in METHODS:
        raise SparkGPTError(f"{source}: quantization_config.method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise SparkGPTError(f"{source}: quantization_config.group_size {group_size!r}; expected an even integer")
    int8_layers = spec.get("int8_layers", [])
    if not isinstance(int8_layers, list) or not all(isinstance(name, str) for name in int8_layers):
        raise SparkGPTError(f"{source}: quantization_config.int8_layers must be a list of layer names")
    return method, group_size, int8_layers


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a quantised checkpoint stores, under our own names: each once (a tied embedding is the head's
    table), each its own contiguous copy (fused layers' rows are views). An untied embedding's scales are stored
    float32, as quantised (the model holds them in its activations' dtype)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state = {name: t for name, t in state.items() if not name.startswith("token_embedding.")}
    elif "token_embedding.scales" in state:
        state["token_embedding.scales"] = state["token_embedding.scales"].float()
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}


def model_from_quantized_state(config: Any, method: str, group_size: int, state: dict[str, torch.Tensor],
                               source: str, dtype: torch.dtype, device: torch.device | str,
                               int8_layers: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Build a quantised GPT from stored tensors, checked against the skeleton's names, shapes and dtypes.
    Float tensors (norms, biases) become `dtype`; the integers and scales stay as stored."""
    with torch.device("meta"):
        model = quantize_skeleton(GPT(config), method, group_size, int8_layers)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected = {name: t for name, t in expected.items() if not name.startswith("token_embedding.")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        problem = f"missing tensor(s) {', '.join(missing[:5])}" if missing else \
            f"unexpected tensor(s) {', '.join(unexpected[:5])}"
        raise SparkGPTError(f"{source}: {problem}")
    loaded = {}
    for name, tensor in state.items():
        want = expected[name]
        quantized_tensor = name.endswith((".qweight", ".scales", ".zeros"))
        if tuple(tensor.shape) != tuple(want.shape) or (quantized_tensor and tensor.dtype != want.dtype):
            raise SparkGPTError(f"{source}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}; the config "
                                f"implies {tuple(want.shape)} {want.dtype}")
        loaded[name] = tensor.to(device)
    if config.tie_embeddings:
        loaded["token_embedding.qweight"] = loaded["lm_head.qweight"]
        loaded["token_embedding.scales"] = loaded["lm_head.scales"]
    model.load_state_dict(loaded, assign=True)
    return float_tensors_to(model, dtype).eval()


def write_model(directory: Path, model: nn.Module) -> None:
    """config.json (the model's family, plus quantization_config), model.safetensors and generation_config.json
    into `directory` (already staged by the caller)."""
    config = model.config
    float_dtype = model.token_embedding.weight.dtype  # a quantised embedding's scales: the activations' dtype
    write_json(directory / hf.CONFIG_FILE,
               {**hf.config_to_hf(config, float_dtype), "quantization_config": quantization_config(model)})
    save_file(quantized_state(model), str(directory / hf.WEIGHTS_FILE), metadata={"format": "pt"})
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    write_json(directory / hf.GENERATION_CONFIG_FILE, {k: v for k, v in generation.items() if v is not None})


def is_quantized_checkpoint(directory: Path) -> bool:
    path = directory / hf.CONFIG_FILE
    return path.is_file() and "quantization_config" in read_json_object(path)


def load_model(directory: Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> nn.Module:
    """The quantised GPT a `write_model` directory holds, its integers and scales used as stored."""
    config, _ = hf.read_config(directory)
    method, group_size, int8_layers = read_quantization(read_json_object(directory / hf.CONFIG_FILE),
                                                        str(directory / hf.CONFIG_FILE))
    files = hf.weight_files(directory)
    return model_from_quantized_state(config, method, group_size, hf.read_tensors(files), str(files[0]), dtype,
                                      device, int8_layers)
