"""TrainConfig: every training hyper-parameter in one dataclass, and the one way to build it.

A config is a named preset or a YAML file (which may itself start from a preset with `preset: NAME`), then
`key=value` overrides on top. Model shape changes are `model_overrides` (YAML) or `model.FIELD=value` (CLI).
Every bad key or value is a one-line error naming it. The resolved config is saved with the run as config.yaml.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sparkgpt.config import PRESETS, ImageTextConfig, ModelConfig, is_image_text, preset
from sparkgpt.data.seq2seq import is_seq2seq
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_write_text
from sparkgpt.model.lora import LoRAConfig


@dataclass
class TrainConfig:
    """How to train: data, model preset, batch shape, optimizer, schedule, precision, evaluation and saving."""

    data: str = ""                      # a prepared data folder (`sparkgpt prepare`)
    model: str = "shakespeare-char"     # a model preset (sparkgpt/config.py)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the preset
    # Fine-tuning: start from a pretrained model (`model` is then ignored) on JSONL data (sparkgpt/data/examples.py).
    init_from: str = ""                 # a model reference (directory, .gguf, alias, hub id)
    val_data: str = ""                  # a JSONL validation file (default: a seeded random 10% of `data`)
    # classify: a sequence-classification head on {"text", "label"} records; dpo: preference tuning (DPO) on
    # {"prompt", "chosen", "rejected"} pairs (sparkgpt/train/preference.py), against the model as it starts
    task: Literal["lm", "classify", "dpo"] = "lm"
    dpo_beta: float = 0.1               # β: how far the policy may move from the reference (the rewards' scale)
    dpo_label_smoothing: float = 0.0    # ε: the chance a pair's preference is wrong (conservative DPO)
    method: Literal["full", "lora"] = "full"  # lora: freeze the model, train low-rank adapters (sparkgpt/model/lora.py)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # linear layers (leaf names) that get adapters
    base_dtype: Literal["float32", "bfloat16"] = "float32"  # lora: the frozen weights' dtype (bfloat16 halves them)
    # Passes over fine-tuning data: a number sets max_steps from the data's size; "auto" (the fine-tuning presets)
    # takes OpenAI's fine-tuning rule (3 passes, yet at least 100 and at most 25,000 examples seen: 1 to 25
    # passes), then lowers batch_size for a small set until the run makes at least `min_steps` optimizer steps.
    epochs: float | Literal["auto"] | None = None
    min_steps: int = 50
    # Distillation (sparkgpt/train/distill.py): the `model` preset learns `teacher`'s softened distribution.
    teacher: str = ""                   # a model reference; `data` must be prepared with its tokenizer
    distill_temperature: float = 2.0    # T: both models' logits are divided by it before the softmax
    distill_alpha: float = 0.5          # the weight of T² · KL(teacher ‖ student); 1 − alpha weighs the CE
    # Batch shape. Tokens per optimizer step = batch_size × block_size × grad_accum × world size.
    block_size: int = 64                # tokens per training sequence
    batch_size: int = 12                # sequences per micro-batch, per process
    grad_accum: int = 1                 # micro-batches per optimizer step, per process
    max_steps: int = 2000               # optimizer steps in the whole run
    # AdamW with decoupled weight decay (none on norms, biases and embeddings).
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0              # clip the global gradient norm to this; 0 disables clipping
    fused: bool = True                  # the fused AdamW kernel (CPU and CUDA); False is the plain for-loop one
    # "muon": Muon (orthogonalised momentum, sparkgpt/train/optim.py) on the blocks' weight matrices at muon_lr
    # (scheduled like lr), AdamW on the rest (embeddings, head, norms, biases). Not with parallel: fsdp.
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    # Learning-rate schedule: linear warmup, then cosine decay to min_lr over the remaining steps, or
    # warmup-stable-decay ("wsd": constant lr, then a linear decay over the last decay_fraction of the steps).
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    warmup_fraction: float | None = None  # when set, the warm-up is this fraction of max_steps (fine-tuning: 0.1)
    decay_fraction: float = 0.2
    # Precision and speed. Weights and optimizer state stay fp32; autocast runs matmuls in `dtype`. "auto": bf16
    # on a GPU that has it; on a CPU the faster of bf16 autocast and float32 for this model and batch, timed once
    # on the CPU at hand and cached (bf16 pays with AMX, can lose on small models without it; see the trainer).
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    compile: bool = False               # torch.compile each block (slow first step, faster after)
    # CPU: glibc keeps freed memory for reuse instead of returning it to the kernel each step (sparkgpt/train/
    # host_memory.py: about 20% faster steps; the process keeps its peak heap)
    keep_host_memory: bool = True
    # Under torchrun: "ddp" replicates the model on every process; "fsdp" shards weights, gradients and AdamW state
    # across them (FSDP2; sharded DCP checkpoints). activation_checkpointing recomputes each block in the backward.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False
    device: str = "auto"                # auto (CUDA when present), cpu, cuda
    seed: int = 1337
    # Evaluation, logging and checkpoints.
    eval_every: int = 250               # evaluate on the validation split every N steps (and at the end)
    eval_batches: int = 20              # validation micro-batches per evaluation
    log_every: int = 10                 # write a metrics row every N steps
    save_every: int = 1000              # checkpoint every N steps (and at the end)
    keep_last: int = 2                  # checkpoints kept besides the best one
    early_stopping: int = 0             # stop after this many evaluations without a lower validation loss (0: never)
    peak_tflops: float | None = None    # the hardware's peak for MFU; None measures this machine's matmul rate

    def validate(self) -> None:
        positive = ("block_size", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                    "log_every", "save_every", "keep_last", "min_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SparkGPTError(f"config key {name!r} is {value!r}; expected a positive integer")
        for name in ("lr", "min_lr", "weight_decay", "eps", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise SparkGPTError(f"config key {name!r} is {value!r}; expected a number ≥ 0")
        if self.lr <= 0:
            raise SparkGPTError(f"config key 'lr' is {self.lr!r}; expected a positive number")
        if self.min_lr > self.lr:
            raise SparkGPTError(f"config key 'min_lr' ({self.min_lr}) is larger than 'lr' ({self.lr})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise SparkGPTError(f"config key {name!r} is {getattr(self, name)!r}; expected a number in [0, 1)")
        if not (math.isfinite(self.muon_lr) and self.muon_lr > 0):
            raise SparkGPTError(f"config key 'muon_lr' is {self.muon_lr!r}; expected a positive number")
        if not 0 <= self.muon_momentum < 1:
            raise SparkGPTError(f"config key 'muon_momentum' is {self.muon_momentum!r}; expected a number in [0, 1)")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise SparkGPTError("config key 'optimizer' is 'muon': it orthogonalises whole matrices, which fsdp "
                                "shards; use parallel: ddp")
        if self.parallel == "fsdp" and is_image_text(self.model) and not self.init_from:
            raise SparkGPTError(f"config key 'parallel' is 'fsdp': its sharded checkpoints hold text models only, and "
                                f"{self.model!r} reads images; use parallel: ddp")
        if not 0 <= self.decay_fraction <= 1:
            raise SparkGPTError(f"config key 'decay_fraction' is {self.decay_fraction!r}; expected a number in [0, 1]")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise SparkGPTError(f"config key 'warmup_steps' is {self.warmup_steps!r}; expected an integer ≥ 0")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise SparkGPTError(f"config key 'peak_tflops' is {self.peak_tflops!r}; expected a positive number")
        for name, allowed in (("schedule", ("cosine", "wsd", "constant")),
                              ("dtype", ("auto", "bfloat16", "float16", "float32")), ("parallel", ("ddp", "fsdp")),
                              ("optimizer", ("adamw", "muon")),
                              ("task", ("lm", "classify", "dpo")), ("method", ("full", "lora")),
                              ("base_dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in allowed:
                raise SparkGPTError(f"config key {name!r} is {getattr(self, name)!r}; expected one of {allowed}")
        if self.base_dtype == "bfloat16" and self.method != "lora":
            raise SparkGPTError("config key 'base_dtype' applies to LoRA's frozen weights; with method 'full' every "
                                "weight trains in fp32 (use dtype=bfloat16 for bf16 compute)")
        if self.parallel == "fsdp" and (self.method == "lora" or self.task != "lm"):
            raise SparkGPTError("parallel 'fsdp' shards whole models; LoRA, classification and preference tuning run "
                                "with parallel 'ddp'")
        if not (math.isfinite(self.dpo_beta) and self.dpo_beta > 0):
            raise SparkGPTError(f"config key 'dpo_beta' is {self.dpo_beta!r}; expected a positive number")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise SparkGPTError(f"config key 'dpo_label_smoothing' is {self.dpo_label_smoothing!r}; expected a "
                                "number in [0, 0.5)")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise SparkGPTError(f"config key 'distill_temperature' is {self.distill_temperature!r}; expected a "
                                "positive number")
        if not 0 <= self.distill_alpha <= 1:
            raise SparkGPTError(f"config key 'distill_alpha' is {self.distill_alpha!r}; expected a number in [0, 1]")
        if self.teacher and (self.init_from or is_seq2seq(self.model)):
            why = "init_from is set" if self.init_from else f"{self.model!r} is an encoder–decoder"
            raise SparkGPTError(f"config key 'teacher' needs a decoder student built from a model preset; {why}")
        if self.epochs not in (None, "auto") and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise SparkGPTError(f"config key 'epochs' is {self.epochs!r}; expected a positive number or auto")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise SparkGPTError(f"config key 'warmup_fraction' is {self.warmup_fraction!r}; expected a number in "
                                "[0, 1)")
        if not isinstance(self.early_stopping, int) or self.early_stopping < 0:
            raise SparkGPTError(f"config key 'early_stopping' is {self.early_stopping!r}; expected an integer ≥ 0")
        if self.data.endswith(".jsonl") and not self.init_from and not is_seq2seq(self.model):
            raise SparkGPTError(f"data {self.data!r} is JSONL fine-tuning data: set init_from (the pretrained model "
                                "whose tokenizer and chat template render it), e.g. `sparkgpt finetune REF`")
        if (self.task != "lm" or self.method == "lora") and not self.init_from:
            raise SparkGPTError(f"config key {'task' if self.task != 'lm' else 'method'!r} needs init_from "
                                "(a pretrained model to fine-tune)")
        if self.init_from:
            self.lora_config().validate()
            return  # the model is the pretrained one; `model` and `model_overrides` do not apply
        if self.model not in PRESETS:
            raise SparkGPTError(f"config key 'model' is {self.model!r}; expected a model preset "
                                f"({', '.join(PRESETS)})")
        self.model_config()  # model_overrides: unknown fields and bad values are named by ModelConfig

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The model this config trains; `vocab_size` (the data's) applies unless the overrides set one."""
        overrides = dict(self.model_overrides)
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        overrides.setdefault("max_seq_len", max(self.block_size, PRESETS[self.model].get("max_seq_len", 0)))
        try:
            return preset(self.model, **overrides)
        except SparkGPTError as error:
            raise SparkGPTError(f"config key 'model_overrides': {error}") from None

    def lora_config(self) -> LoRAConfig:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, targets,
                          ("score",) if self.task == "classify" else ())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def auto_epochs(examples: int, examples_per_step: int, min_steps: int) -> tuple[int, int]:
    """`epochs: auto`: (passes, examples per optimizer step) for a fine-tuning set of `examples`. OpenAI's rule
    sees at least 100 and at most 25,000 examples (3 passes between); a small set then takes smaller steps, down to
    one example, so the optimizer moves at least `min_steps` times (a handful of steps, mostly warm-up, teach
    nothing)."""
    epochs = 3
    if epochs * examples < 100:
        epochs = min(25, math.ceil(100 / examples))
    elif epochs * examples > 25_000:
        epochs = max(1, 25_000 // examples)
    per_step = max(1, min(examples_per_step, epochs * examples // min_steps))
    return epochs, per_step


_SHAKESPEARE = dict(eval_every=250, eval_batches=20, log_every=10)
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear layer of a block
_FINETUNE = dict(block_size=1024, batch_size=8, epochs="auto", warmup_fraction=0.1, weight_decay=0.0, eval_every=50,
                 eval_batches=4, log_every=5, save_every=100, dtype="bfloat16")

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The Transformer family on a CPU (sparkgpt/config.py): alternating dense/local attention and mixture of experts
    # on shakespeare-char's recipe, and an encoder–decoder on sequence-to-sequence JSONL ({"source", "target"}).
    "shakespeare-sparse": dict(_SHAKESPEARE, model="shakespeare-sparse", block_size=256, batch_size=8,
                               max_steps=2000, lr=2e-3, min_lr=2e-4, warmup_steps=50, save_every=500),
    "shakespeare-moe": dict(_SHAKESPEARE, model="shakespeare-moe", block_size=64, batch_size=12, max_steps=2000,
                            lr=2e-3, min_lr=2e-4, warmup_steps=50, save_every=500),
    "seq2seq-small": dict(model="seq2seq-small", block_size=64, batch_size=32, max_steps=2000, lr=1e-3,
                          min_lr=1e-4, warmup_steps=100, eval_every=250, eval_batches=4, log_every=10,
                          save_every=1000, dtype="float32"),
    # An image question answerer on a prepared image question folder (`sparkgpt prepare easy-vqa`): each step 16
    # images with every question about them (~150 questions), AdamW at a transformer-from-scratch lr.
    "easy-vqa": dict(model="easy-vqa", block_size=64, batch_size=16, max_steps=3000, lr=1e-3, min_lr=1e-4,
                     warmup_steps=50, beta2=0.99, eval_every=250, eval_batches=8, log_every=25, save_every=500),
    # nanoGPT's CPU recipe shape (4 layers, 4 heads, 128 wide, block 64, batch 12) with sparkgpt's choices:
    # a Llama-style block (RoPE, RMSNorm, SwiGLU), the dtype measured fastest here, the fused AdamW, a higher peak
    # lr, and torch.compile (such a small model's step is mostly per-op overhead, which compiling removes).
    "shakespeare-char": dict(_SHAKESPEARE, model="shakespeare-char", block_size=64, batch_size=12, max_steps=2000,
                             lr=2e-3, min_lr=2e-4, warmup_steps=50, beta2=0.99, save_every=500, compile=True),
    # The speed run (benchmarks/bench_train.py's race): held-out loss 1.89 in the least wall time on a CPU, with the
    # same model. Muon on the blocks' matrices, batch 48 at a 6x higher lr, a 150-step schedule, no compilation (150
    # steps cannot repay it); each evaluation scores nanoGPT's 240 validation sequences.
    "shakespeare-char-speedrun": dict(_SHAKESPEARE, model="shakespeare-char", block_size=64, batch_size=48,
                                      max_steps=150, optimizer="muon", muon_lr=0.05, lr=1.2e-2, min_lr=1.2e-3,
                                      warmup_steps=10, beta2=0.99, eval_every=50, eval_batches=5, log_every=25,
                                      save_every=150),
    # nanoGPT's "baby GPT" (6 layers, 6 heads, 384 wide, block 256, batch 64), Llama-style.
    "shakespeare-baby": dict(_SHAKESPEARE, model="shakespeare-baby", block_size=256, batch_size=64,
                             max_steps=5000, lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, save_every=500,
                             compile=True),
    # Fine-tuning a pretrained model (`sparkgpt finetune`): whole examples up to 1,024 tokens, sized to the data
    # (`epochs: auto`, warm-up 10% of the run), no decay (the pretrained weights are not to be pulled toward zero).
    # LoRA trains a few new weights from zero and takes a far higher lr than updating every weight; on every linear
    # layer of the blocks, MLPs included (QLoRA's finding: attention-only adapters learn less), since facts live
    # largely in the MLPs. DPO moves a policy away from its reference by small steps (TRL's defaults: 1e-6 in
    # full; LoRA 5e-6 ... 5e-5).
    "finetune-lora": dict(_FINETUNE, method="lora", lr=4e-4, min_lr=4e-5, lora_targets=ALL_LINEAR),
    "finetune-full": dict(_FINETUNE, method="full", lr=2e-5, min_lr=2e-6),
    "finetune-dpo-lora": dict(_FINETUNE, task="dpo", method="lora", lr=5e-5, min_lr=5e-6),
    "finetune-dpo-full": dict(_FINETUNE, task="dpo", method="full", lr=1e-6, min_lr=1e-7),
    # GPT-2 small (124M) from scratch on a GPU (nanoGPT's train_gpt2 recipe: ~0.5M tokens per step on 8 GPUs).
    "gpt2": dict(model="gpt2", block_size=1024, batch_size=12, grad_accum=40, max_steps=600_000, lr=6e-4,
                 min_lr=6e-5, warmup_steps=2000, beta2=0.95, weight_decay=0.1, eval_every=1000, eval_batches=200,
                 save_every=1000, log_every=10, compile=True),
    # The same budget with a Llama-style 124M model.
    "sparkgpt-124m": dict(model="sparkgpt-124m", block_size=1024, batch_size=12, grad_accum=40, max_steps=600_000,
                          lr=6e-4, min_lr=6e-5, warmup_steps=2000, beta2=0.95, weight_decay=0.1, eval_every=1000,
                          eval_batches=200, save_every=1000, log_every=10, compile=True),
}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _convert(name: str, value: Any, kind: Any, source: str) -> Any:
    """A value (a YAML scalar or a CLI string) as the field's type, or a one-line error naming the key."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[1:]:  # a word the field allows besides its type ("auto")
            if typing.get_origin(option) is Literal and value in typing.get_args(option):
                return value
        return _convert(name, value, options[0], source)
    if origin is Literal:
        if value not in args:
            raise SparkGPTError(f"{source}: config key {name!r} is {value!r}; expected one of {', '.join(args)}")
        return value
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            return str(value)
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "a mapping")
        raise SparkGPTError(f"{source}: config key {name!r} is {value!r}; expected {expected}") from None
    return value


def _apply(values: dict[str, Any], changes: dict[str, Any], source: str) -> None:
    types_by_name = _field_types()
    if "max_steps" in changes and "epochs" not in changes:
        values["epochs"] = None  # a step count given on its own replaces a preset's epochs
    for name, value in changes.items():
        if name.startswith("model."):  # model.n_layers=6 on the command line
            model_field = name.removeprefix("model.")
            known = {f.name for f in dataclasses.fields(ImageTextConfig)}  # an image front end's too
            if model_field not in known:
                raise SparkGPTError(f"{source}: unknown model field {model_field!r}; known: {', '.join(sorted(known))}")
            kind = typing.get_type_hints(ImageTextConfig)[model_field]
            parsed = yaml.safe_load(value) if isinstance(value, str) else value
            if typing.get_origin(kind) in (typing.Union, types.UnionType) or kind in (int, float, bool, str):
                parsed = _convert(name, value, kind, source)
            values["model_overrides"] = {**values.get("model_overrides", {}), model_field: parsed}
            continue
        if name not in types_by_name:
            raise SparkGPTError(f"{source}: unknown config key {name!r}; known: {', '.join(sorted(types_by_name))}")
        values[name] = _convert(name, value, types_by_name[name], source)


def load_train_config(spec: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A preset name or YAML file (or None: the defaults), then `overrides` ({key: value}) on top, validated."""
    values: dict[str, Any] = TrainConfig().to_dict()
    if spec is not None:
        text = str(spec)
        if text in TRAIN_PRESETS:
            _apply(values, TRAIN_PRESETS[text], f"preset {text!r}")
        elif Path(text).is_file() or text.endswith((".yaml", ".yml")):
            path = Path(text)
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise SparkGPTError(f"{path}: no such config file") from None
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
                reason = str(error).replace("\n", " ")
                raise SparkGPTError(f"{path}: not a readable YAML file ({reason})") from None
            loaded = {} if loaded is None else loaded
            if not isinstance(loaded, dict):
                raise SparkGPTError(f"{path}: expected a mapping of config keys, found {type(loaded).__name__}")
            base = loaded.pop("preset", None)
            if base is not None:
                if base not in TRAIN_PRESETS:
                    raise SparkGPTError(f"{path}: 'preset' is {base!r}; expected one of {', '.join(TRAIN_PRESETS)}")
                _apply(values, TRAIN_PRESETS[base], f"preset {base!r}")
            _apply(values, loaded, str(path))
        else:
            raise SparkGPTError(f"config {text!r}: not a training preset ({', '.join(TRAIN_PRESETS)}) or a YAML file")
    _apply(values, overrides or {}, "command line")
    config = TrainConfig(**values)
    config.validate()
    return config


def save_train_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically: a reader or a crash sees the old file or the new one."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
