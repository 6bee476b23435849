"""The training loop: one function, `train`, used the same way by one process or by every rank under torchrun.

Per optimizer step: set the scheduled lr; for each micro-batch, forward under autocast and backward the loss
divided by the number of micro-batches (DDP all-reduces gradients on the last one only); clip the global gradient
norm; stop if the loss or the norm is not finite (before the update, so no bad weight is ever written); step.
Rank 0 logs (progress bar, metrics.jsonl, loss.png), evaluates and saves; the others wait at the save.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

import sparkgpt.train.checkpoints as checkpoints
import sparkgpt.train.parallel as parallel
import sparkgpt.train.sharded as sharded
from sparkgpt import hardware
from sparkgpt.checkpoint.adapter import is_adapter
from sparkgpt.checkpoint.dcp import is_dcp_checkpoint
from sparkgpt.checkpoint.load import load
from sparkgpt.checkpoint.registry import resolve
from sparkgpt.config import is_image_text
from sparkgpt.data.examples import IGNORE, FinetuneData, micro_batch_rows
from sparkgpt.data.images import vit_preprocessing
from sparkgpt.data.seq2seq import Seq2SeqData, is_seq2seq
from sparkgpt.data.tokens import TokenData, eval_offsets, gather, step_offsets
from sparkgpt.data.vqa import ImageQAData
from sparkgpt.errors import SparkGPTError
from sparkgpt.files import atomic_file, atomic_write_text
from sparkgpt.model import GPT
from sparkgpt.model.heads import SequenceClassifier
from sparkgpt.model.lora import apply_lora
from sparkgpt.model.vision import ImageText
from sparkgpt.tokenizer import TOKENIZER_FILE, Tokenizer
from sparkgpt.train.config import TrainConfig, auto_epochs, load_train_config, save_train_config
from sparkgpt.train.distributed import Distributed
from sparkgpt.train.host_memory import keep_freed_memory
from sparkgpt.train.optim import build_optimizer, learning_rate, set_learning_rate

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device) -> str:
    """The training dtype that `auto` starts from: bfloat16 on hardware that multiplies it natively (a CUDA GPU
    with bf16, a CPU with AMX, AVX512-BF16 or ARM's BF16), else float32."""
    if device.type == "cuda":
        return "bfloat16" if hardware.cuda_bf16(device) else "float32"
    if device.type == "cpu":
        return "bfloat16" if hardware.cpu().native_bf16 else "float32"
    return "float32"


class TrainingDiverged(SparkGPTError):
    """The loss or the gradient norm stopped being a finite number."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    elapsed_s: float
    best_checkpoint: Path | None = None  # the lowest validation loss of the run's checkpoints
    stopped_early: bool = False


def compute_loss(model: torch.nn.Module, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -100 (padding, prompts), logits in fp32 first so bf16
    rounding never reaches the softmax. `inputs` is token ids [B, T], or a batch object whose `model_args()` the
    model takes (an encoder–decoder's source/mask/decoder input; a classifier's ids and lengths, with targets [B])."""
    logits = model(*inputs.model_args()) if hasattr(inputs, "model_args") else model(inputs)
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def flops_per_token(model: torch.nn.Module, block_size: int) -> float:
    """Training FLOPs per token (PaLM's estimate, as nanoGPT): 2 per weight forward, 2 backward for the
    activations' gradients, 2 more for the weight's own gradient when it trains (not for frozen LoRA bases), plus
    attention. An image-to-text model counts its decoder's weights only: its tokens are the text's, and the image
    encoder's work per image is left out (an underestimate, never an inflated utilisation)."""
    config = model.config
    image_encoder = ("patch_embeddings.", "encoder_blocks.", "encoder_norm.") if isinstance(model, ImageText) else ()
    weights = [p for name, p in model.named_parameters() if not name.startswith(image_encoder)]
    params = sum(p.numel() for p in weights)
    trained = sum(p.numel() for p in weights if p.requires_grad)
    decoder = getattr(model, "backbone", model)
    if config.positions == "learned":
        positions = getattr(decoder, "embeddings", decoder).position_embedding.weight  # a lookup, not a matmul
        params -= positions.numel()
        trained -= positions.numel() if positions.requires_grad else 0
    return 4 * params + 2 * trained + 12 * config.n_layers * config.n_heads * config.head_dim * block_size


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float | None) -> float:
    """The FLOP/s that MFU divides by: the configured figure, a known GPU's datasheet bf16 peak, or on CPU the best
    rate of a large matmul in the training dtype over five short windows, measured here (what this machine can
    actually do: shared machines' cores change speed from one second to the next, and the best window is the
    least disturbed)."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L4", 121), ("A10", 125), ("4090", 165)):
            if key in name:
                return tflops * 1e12
        return 100e12
    size = 1024
    own = torch.Generator().manual_seed(0)  # not the global one: a resumed run's restored RNG must stay untouched
    a = torch.randn(size, size, dtype=dtype, generator=own)
    b = torch.randn(size, size, dtype=dtype, generator=own)
    product = a @ b  # warms the kernels up
    best = 0.0
    for _ in range(5):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.05:
            torch.mm(a, b, out=product)
            runs += 1
        best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
    return best


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


class Trainer:
    """State of one training run in this process; `run()` trains to `config.max_steps`."""

    def __init__(self, config: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        self.config, self.run_dir, self.progress = config, run_dir, progress
        if not config.data:
            raise SparkGPTError("no training data: pass --data (a folder made by `sparkgpt prepare`, or a JSONL "
                                "file to fine-tune on)")
        probe_device = Distributed().device(config.device)
        self.dist = Distributed.from_env(probe_device)
        self.device = self.dist.device(config.device)
        if self.device.type == "cpu" and config.keep_host_memory:
            keep_freed_memory()
        torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.model, self.tokenizer, self.data = self._pretrained() if config.init_from else self._from_scratch()
        if self.config.dtype == "auto":  # resolved before the run's config is saved; a resumed run keeps its own
            chosen = ""
            if self.dist.is_main:  # under torchrun rank 0 decides (and times) and every rank takes its choice
                saved = run_dir / CONFIG_FILE
                kept = load_train_config(saved).dtype if resume and saved.is_file() else "auto"
                chosen = self._fastest_dtype() if kept == "auto" else kept
            self.config = dataclasses.replace(self.config, dtype=self.dist.broadcast(chosen))
        config = self.config  # fine-tuning may have capped block_size at the model's context
        self.train_model = parallel.parallelize(self.model, config, self.dist, self.device)  # before the optimizer
        if self.dist.is_main and isinstance(self.data, FinetuneData) and (progress or self.data.dropped_any):
            tqdm.write(self.data.summary(), file=sys.stderr)  # truncated or skipped examples are always reported
        if config.epochs is not None and not resume:  # a resumed run keeps the schedule its config.yaml saved
            config = self.config = self._schedule_from_epochs(config)
        self.optimizer = build_optimizer(self.model, config)
        self.step = 0
        self.elapsed_s = 0.0
        self.last_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.last_aux_loss: float | None = None
        if resume:
            self._resume()
        else:
            self._start_fresh()
        self.autocast_dtype = None if parallel.casts_weights(self.model) else _AUTOCAST.get(config.dtype)
        self.tokens_per_step = config.batch_size * config.block_size * config.grad_accum * self.dist.world_size
        self.flops_per_token = flops_per_token(self.model, config.block_size)
        self.peak = peak_flops(self.device, self.autocast_dtype or torch.float32, config.peak_tflops) \
            if self.dist.is_main else 1.0
        if self.dist.is_main and progress and not resume:
            tqdm.write(self._plan(), file=sys.stderr)

    def _schedule_from_epochs(self, config: TrainConfig) -> TrainConfig:
        """max_steps from passes over the data; with `epochs: auto` the passes and the batch too (`auto_epochs`),
        evaluating (and saving) at least five times so the best checkpoint and early stopping have a choice. The
        saved config holds the numbers chosen, so a resumed run continues the same schedule."""
        ranks_and_accum = config.grad_accum * self.dist.world_size
        changes: dict[str, Any] = {}
        epochs = config.epochs
        if epochs == "auto":
            if not isinstance(self.data, FinetuneData):
                raise SparkGPTError("config key 'epochs' is auto, which sizes a fine-tuning run by its examples; for "
                                    "a prepared token folder set max_steps or a number of epochs")
            epochs, per_step = auto_epochs(len(self.data.train), config.batch_size * ranks_and_accum,
                                           config.min_steps)
            changes["batch_size"] = max(1, per_step // ranks_and_accum)
        per_step = changes.get("batch_size", config.batch_size) * ranks_and_accum
        per_step *= config.block_size if isinstance(self.data, TokenData) else 1
        max_steps = max(1, math.ceil(epochs * len(self.data.train) / per_step))
        changes.update(epochs=float(epochs), max_steps=max_steps)
        if config.epochs == "auto":
            every = math.ceil(max_steps / 5)
            changes.update(eval_every=min(config.eval_every, every), save_every=min(config.save_every, every))
        if config.warmup_fraction is not None:
            changes["warmup_steps"] = math.ceil(config.warmup_fraction * max_steps)
        return dataclasses.replace(config, **changes)

    def _plan(self) -> str:
        """What the run will do, before it does it: examples or tokens, passes, steps, the lr schedule, and the time
        one micro-batch's forward and backward takes here, scaled to the run (evaluations not counted)."""
        config = self.config
        if isinstance(self.data, TokenData):
            data = f"{len(self.data.train):,} tokens"
        else:
            data = f"{len(self.data.train):,} examples ({self.data.train_tokens:,} tokens)"
        passes = f"{config.epochs:g} epochs, " if config.epochs is not None else ""
        unit = "sequences" if isinstance(self.data, TokenData) else "examples"
        plan = (f"plan: {data}; {passes}{config.max_steps:,} optimizer steps of {config.batch_size} × "
                f"{config.grad_accum} × {self.dist.world_size} {unit}; lr {config.lr:g} after "
                f"{config.warmup_steps} warm-up steps")
        if self.dist.enabled:  # one rank's backward alone would wait forever for the others' gradients
            return plan
        if config.compile:  # the first step compiles: its time says nothing of the others
            return f"{plan}; compiling first"
        inputs, targets = self._batch(0, 0)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            start = time.perf_counter()
            with self._autocast():
                self.objective(inputs, targets)[0].backward()
            seconds = (time.perf_counter() - start) * config.grad_accum * config.max_steps
        self.model.zero_grad(set_to_none=True)
        return f"{plan}; about {_duration(seconds)} of training here"

    def _fastest_dtype(self) -> str:
        """`dtype: auto`. A GPU computes in bf16 where it has it. On a CPU, bf16 autocast halves the bytes and, with
        AMX or AVX512-BF16, multiplies faster, but it adds a cast per matmul, which a small model cannot repay: so
        the forward and backward of the first micro-batch (at most 4,096 tokens of it) is timed in each, eagerly,
        before the model is compiled or wrapped, without touching the run's random state, and the choice is cached
        for this CPU and model shape (`hardware.fastest`). Under torchrun rank 0 alone runs this (every rank takes
        its choice, so all ranks compute alike); a model FSDP will shard (not yet allocated here) takes the
        capability default."""
        config, default = self.config, default_dtype(self.device)
        if self.device.type != "cpu" or parallel.is_sharded(config, self.dist):
            return hardware.note("training dtype", default, f"{self.device.type}: "
                                 + ("bf16 supported" if default == "bfloat16" else "no bf16 support")
                                 + (", not timed for a sharded model" if self.device.type == "cpu" else ""))
        inputs, targets = self._batch(0, 0)
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 2:  # a bounded cost, whatever the model and batch
            rows = max(1, 4096 // inputs.shape[1])
            inputs, targets = inputs[:rows], targets[:rows]

        def step(dtype: str):
            def run() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    loss = compute_loss(self.model, inputs, targets)
                loss.backward()
            return run

        candidates = {name: step(name) for name in (default, "float32" if default == "bfloat16" else "bfloat16")}
        shape = f"{config.batch_size} × {config.block_size}"
        setting = f"{self.model!r} {shape} compile={config.compile} checkpointing={config.activation_checkpointing}"
        key = "training dtype " + hashlib.sha1(setting.encode()).hexdigest()[:12]
        with torch.random.fork_rng(devices=[]):
            chosen = hardware.fastest(f"training dtype ({config.model or config.init_from}, micro-batch {shape})", key,
                                      candidates)
        self.model.zero_grad(set_to_none=True)
        return chosen

    # ---- the model and its data ------------------------------------------------------------------------------

    def _from_scratch(self) -> tuple[torch.nn.Module, Tokenizer | None, Any]:
        """A randomly initialised `model` preset, sized to a prepared data folder (or seq2seq pairs, or image
        questions)."""
        config = self.config
        if is_image_text(config.model):  # images read at the model's size, before the vocabulary sizes the model
            size = config.model_config().image_size
            data = ImageQAData(config.data, vit_preprocessing(size))
        else:  # an encoder–decoder reads source/target pairs
            data = (Seq2SeqData if is_seq2seq(config.model) else TokenData)(config.data)
        data.check_block_size(config.block_size)
        model_config = config.model_config(vocab_size=data.vocab_size)
        if isinstance(data, (Seq2SeqData, ImageQAData)):
            model_config = model_config.replace(**data.model_fields)
        self._check_fits(model_config, data)
        tokenizer_path = data.directory / TOKENIZER_FILE
        tokenizer = Tokenizer.from_dir(data.directory) if tokenizer_path.is_file() else None
        if isinstance(data, (Seq2SeqData, ImageQAData)):
            tokenizer = data.tokenizer
        return parallel.new_model(model_config, config, self.dist, self.device), tokenizer, data

    def _pretrained(self) -> tuple[torch.nn.Module, Tokenizer, Any]:
        """The model `init_from` names, ready to fine-tune: with a classification head for `task: classify`, frozen
        with LoRA adapters for `method: lora`; its data a JSONL file, or a prepared folder (continued pretraining)."""
        config = self.config
        if config.method == "lora" and is_adapter(resolve(config.init_from)):
            raise SparkGPTError(f"init_from {config.init_from!r} is a LoRA adapter: merge it into its base first "
                                "(`sparkgpt merge-lora`) and fine-tune the merged model")
        loaded, tokenizer = load(config.init_from, dtype="float32", device=self.device)
        model = loaded.backbone if isinstance(loaded, SequenceClassifier) else loaded
        if not isinstance(model, GPT):
            raise SparkGPTError(f"init_from {config.init_from!r}: fine-tuning needs a decoder (GPT) model; this one is "
                                f"{model.config.architecture!r}")
        if tokenizer is None:
            raise SparkGPTError(f"init_from {config.init_from!r}: the model has no tokenizer to read the data with")
        if config.block_size > model.config.max_seq_len and not Path(config.data).is_dir():
            # Examples are truncated to block_size: a model with a shorter context truncates them to that instead.
            config = self.config = dataclasses.replace(config, block_size=model.config.max_seq_len)
        if Path(config.data).is_dir():
            data = TokenData(config.data)
            data.check_block_size(config.block_size)
        else:
            data = self._finetune_data(tokenizer)
        self._check_fits(model.config, data)
        if config.task == "classify":
            same_head = isinstance(loaded, SequenceClassifier) and loaded.labels == data.labels
            model = loaded if same_head else SequenceClassifier(model, data.labels)
        if config.method == "lora":
            if config.base_dtype == "bfloat16":  # the frozen decoder; the adapters (made next) and a head stay fp32
                getattr(model, "backbone", model).to(torch.bfloat16)
            apply_lora(model, config.lora_config())
        return model.train(), tokenizer, data

    def _finetune_data(self, tokenizer: Tokenizer) -> FinetuneData:
        """The JSONL records, tokenised for this run's task (preference tuning reads pairs instead)."""
        config = self.config
        return FinetuneData(config.data, config.val_data or None, tokenizer, config.block_size, config.task,
                            seed=config.seed)

    def _check_fits(self, model_config: Any, data: Any) -> None:
        if model_config.vocab_size < data.vocab_size:
            raise SparkGPTError(
                f"model vocab_size {model_config.vocab_size} is smaller than the data's vocabulary "
                f"({data.vocab_size}, {data.directory}); the token ids would not fit")
        if self.config.block_size > model_config.max_seq_len:
            raise SparkGPTError(f"config key 'block_size' ({self.config.block_size}) exceeds the model's max_seq_len "
                                f"({model_config.max_seq_len})")

    # ---- starting and resuming ----------------------------------------------------------------------------

    def _start_fresh(self) -> None:
        existing = self.run_dir / CONFIG_FILE
        if existing.exists() or checkpoints.list_checkpoints(self.run_dir):
            raise SparkGPTError(f"{self.run_dir}: already holds a training run; pass --resume to continue it, "
                                "or choose another --out")
        self.dist.barrier()  # every rank has looked before rank 0 writes
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_train_config(self.config, self.run_dir / CONFIG_FILE)  # atomic, as every snapshot below
            atomic_write_text(self.run_dir / METRICS_FILE, "")
        self.dist.barrier()

    def _resume(self) -> None:
        found = checkpoints.list_checkpoints(self.run_dir)
        self.dist.barrier()  # every rank has listed the checkpoints before rank 0 sweeps partial saves
        if self.dist.is_main:
            checkpoints.sweep_partial_saves(self.run_dir)
        if not found:
            # Killed before its first checkpoint: nothing to continue from, so start over in the same folder.
            self.dist.barrier()
            if self.dist.is_main and (self.run_dir / CONFIG_FILE).exists():
                (self.run_dir / CONFIG_FILE).unlink()
            self.dist.barrier()
            self._start_fresh()
            return
        latest = found[-1]
        if is_dcp_checkpoint(latest.path):
            state = sharded.restore_checkpoint(latest.path, self.model, self.optimizer)
        elif parallel.is_sharded(self.config, self.dist):
            raise SparkGPTError(f"{latest.path}: saved by a ddp run; resume it with --parallel ddp")
        else:
            state = checkpoints.restore_checkpoint(latest.path, self.model, self.optimizer)
        if state.get("tokens_per_step") not in (None, self._tokens_per_step()):
            raise SparkGPTError(f"{latest.path}: saved with {state['tokens_per_step']} tokens per step; this run has "
                                f"{self._tokens_per_step()} (keep batch_size × grad_accum × processes the same)")
        self.step, self.elapsed_s = state["step"], state.get("elapsed_s", 0.0)
        self.last_val_loss, self.last_checkpoint = state.get("val_loss"), latest.path
        if self.dist.is_main:
            save_train_config(self.config, self.run_dir / CONFIG_FILE)
            self._truncate_metrics(self.step)
        self.dist.barrier()

    def _tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.block_size * self.config.grad_accum * self.dist.world_size

    def _truncate_metrics(self, step: int) -> None:
        """Drop the rows a killed run wrote after its last checkpoint: the resumed run writes them again."""
        path = self.run_dir / METRICS_FILE
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
            if path.exists() else []
        kept = []
        for line in rows:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a row cut short by the kill
        atomic_write_text(path, "".join(row + "\n" for row in kept))

    # ---- the loop -------------------------------------------------------------------------------------------

    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch `micro` of step `step`: a slice of the step's global batch (see datasets.py)."""
        config = self.config
        per_rank = config.batch_size * config.grad_accum
        if not isinstance(self.data, TokenData):  # whole examples, drawn per step as the token windows are
            rows = micro_batch_rows(self.data.step_rows(config.seed, step, per_rank * self.dist.world_size),
                                    self.dist.rank, self.dist.world_size, micro, config.batch_size)
            inputs, targets = self.data.batch(self.data.train, rows)
            return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        offsets = step_offsets(len(self.data.train), config.block_size, config.seed, step,
                               per_rank * self.dist.world_size)
        start = self.dist.rank * per_rank + micro * config.batch_size
        inputs, targets = gather(self.data.train, offsets[start:start + config.batch_size], config.block_size)
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def objective(self, inputs: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(What the backward minimises, the next-token loss that is logged) for one micro-batch; distillation
        (distill.py) overrides it to add the teacher's term."""
        loss = compute_loss(self.train_model, inputs, targets)
        return loss, loss

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (mean loss over the global batch, gradient norm before clipping)."""
        config = self.config
        set_learning_rate(self.optimizer, learning_rate(self.step, config))
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        moe_coef = getattr(self.model.config, "router_aux_loss_coef", 0.0) if self.model.config.n_experts else 0.0
        tokens = 0
        batches = [self._batch(self.step, micro) for micro in range(config.grad_accum)]
        # Each micro-batch weighs by its share of the step's target tokens on all ranks, so the step minimises the
        # mean over every target token however examples of different lengths fall into micro-batches (token
        # windows all have the same count; DDP's gradient average over ranks is undone by the world size).
        counts = [self._target_count(targets) for _, targets in batches]
        total = sum(counts) * self.dist.world_size if isinstance(self.data, TokenData) else \
            self.dist.sum(torch.tensor(float(sum(counts)), device=self.device)).item()  # ranks' counts differ
        for micro, (inputs, targets) in enumerate(batches):
            tokens += inputs.tokens() if hasattr(inputs, "tokens") else \
                (inputs if isinstance(inputs, torch.Tensor) else inputs.model_args()[0]).numel()
            with self.dist.gradient_sync(self.train_model, sync=micro == config.grad_accum - 1), self._autocast():
                objective, loss = self.objective(inputs, targets)
                if moe_coef:  # mixture of experts: the model's load-balancing loss joins the objective
                    objective = objective + moe_coef * self.model.aux_loss
                    aux_sum += self.model.aux_loss.detach()
                (objective * (counts[micro] * self.dist.world_size / total)).backward()
            loss_sum += loss.detach() * counts[micro]
        loss = self.dist.sum(loss_sum).item() / total
        self.last_aux_loss = self.dist.mean(aux_sum / config.grad_accum).item() if moe_coef else None
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = parallel.full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = self.last_checkpoint or "none was saved yet"
            raise TrainingDiverged(
                f"step {self.step + 1}: the loss is {loss} and the gradient norm {grad_norm}; stopped before updating "
                f"the weights (lower lr or raise warmup_steps). Last good checkpoint: {where}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.step_tokens = tokens * self.dist.world_size  # as processed, padding included (examples vary in length)
        return loss, grad_norm

    def _target_count(self, targets: torch.Tensor) -> int:
        """The targets that carry loss (not -100: padding, prompts); every one, for token windows."""
        return targets.numel() if isinstance(self.data, TokenData) else int((targets != IGNORE).sum())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the fixed evaluation sequences (shared out across ranks)."""
        config = self.config
        examples = not isinstance(self.data, TokenData)
        count = config.eval_batches * config.batch_size
        offsets = self.data.eval_rows(config.seed, count) if examples else \
            eval_offsets(len(self.data.val), config.block_size, config.seed, count)
        model = self.train_model if not self.dist.enabled else self.model
        self.model.eval()
        total = torch.zeros((), device=self.device)
        counted = torch.zeros((), device=self.device)
        batches = math.ceil(len(offsets) / config.batch_size)  # fewer than eval_batches for a small validation file
        # Every rank runs as many forwards (FSDP all-gathers in each); one past the end repeats batch 0, uncounted.
        rounds = math.ceil(batches / self.dist.world_size) * self.dist.world_size
        for batch in range(self.dist.rank, rounds, self.dist.world_size):
            real = batch < batches
            rows = offsets[batch * config.batch_size:(batch + 1) * config.batch_size] if real else \
                offsets[:config.batch_size]
            inputs, targets = self.data.batch(self.data.val, rows) if examples else \
                gather(self.data.val, rows, config.block_size)
            with self._autocast():
                loss = self.validation_loss(model, inputs.to(self.device), targets.to(self.device), real)
            if real:  # weighted by its target tokens: the mean over every validation token
                count = self._target_count(targets)
                total += loss * count
                counted += count
        self.model.train()
        return (self.dist.sum(total) / self.dist.sum(counted)).item()

    def validation_loss(self, model: torch.nn.Module, inputs: Any, targets: torch.Tensor, counted: bool
                        ) -> torch.Tensor:
        """One validation micro-batch's mean loss (`counted`: it is part of the result, not a rank's filler)."""
        return compute_loss(model, inputs, targets)

    def eval_metrics(self) -> dict[str, float]:
        """What the last evaluation measured besides its loss, for the metrics file (preference tuning's rewards)."""
        return {}

    def save(self, val_loss: float | None) -> None:
        state = {"step": self.step, "val_loss": val_loss, "elapsed_s": self.elapsed_s,
                 "tokens_per_step": self.tokens_per_step, "world_size": self.dist.world_size,
                 "batch_size": self.config.batch_size, "grad_accum": self.config.grad_accum}
        if self.config.parallel == "fsdp":  # every rank writes its shards (sharded.py)
            self.last_checkpoint = sharded.save_checkpoint(
                self.run_dir, self.model, self.tokenizer, self.optimizer, self.config, state, self.dist)
            if self.dist.is_main:
                checkpoints.prune_checkpoints(self.run_dir, self.config.keep_last)
        elif self.dist.is_main:
            self.last_checkpoint = checkpoints.save_checkpoint(
                self.run_dir, self.model, self.tokenizer, self.optimizer, self.config, state)
            checkpoints.prune_checkpoints(self.run_dir, self.config.keep_last)
        self.dist.barrier()

    def _log(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def close(self) -> None:
        """Leave the process group. The DDP wrapper goes first, while the group is still registered: otherwise its
        C++ reducer drops the last reference to gloo's group and joins gloo's worker threads holding the GIL, which a
        worker still freeing a finished collective's tensors waits for (a deadlock, seen on a loaded 2-core machine).
        Released through Python, the group is destroyed with the GIL let go."""
        self.train_model = self.model
        gc.collect()  # the wrapper's hooks may hold it in reference cycles
        self.dist.close()

    def run(self) -> TrainResult:
        config = self.config
        bar = tqdm(total=config.max_steps, initial=self.step, desc="training", unit="step",
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=True)
        loss = None
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
        best_val, evals_since_best, stopped_early = math.inf, 0, False
        try:
            while self.step < config.max_steps:
                step_start = time.perf_counter()
                loss, grad_norm = self.train_step()
                self.elapsed_s += time.perf_counter() - step_start
                window_steps += 1
                window_tokens += self.step_tokens
                bar.update(1)
                final = self.step == config.max_steps
                if self.step % config.log_every == 0 or final:
                    seconds = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / seconds
                    mfu = self.flops_per_token * tokens_per_s / self.peak
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                    mfu=f"{mfu:.1%}", refresh=False)
                    if self.dist.is_main:
                        row = {"kind": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": self.elapsed_s}
                        if self.last_aux_loss is not None:
                            row["aux_loss"] = self.last_aux_loss  # MoE load balancing (k when balanced)
                        self._log(row)
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
                save_now = self.step % config.save_every == 0 or final
                if self.step % config.eval_every == 0 or save_now:
                    eval_start = time.perf_counter()
                    self.last_val_loss = self.evaluate()
                    self.elapsed_s += time.perf_counter() - eval_start
                    if self.dist.is_main:
                        self._log({"kind": "eval", "step": self.step, "val_loss": self.last_val_loss,
                                   "val_ppl": math.exp(min(self.last_val_loss, 50)), "elapsed_s": self.elapsed_s,
                                   **self.eval_metrics()})
                        plot_losses(self.run_dir / METRICS_FILE, self.run_dir / PLOT_FILE)
                        if self.progress:
                            bar.write(f"step {self.step}: train loss {loss:.4f}, val loss {self.last_val_loss:.4f}")
                    if self.last_val_loss < best_val:
                        best_val, evals_since_best = self.last_val_loss, 0
                    else:
                        evals_since_best += 1
                    # the same on every rank: the validation loss is reduced across them
                    stopped_early = 0 < config.early_stopping <= evals_since_best
                    if save_now or stopped_early:
                        self.save(self.last_val_loss)
                    if stopped_early:
                        if self.progress and self.dist.is_main:
                            bar.write(f"step {self.step}: stopping early, no lower validation loss in "
                                      f"{evals_since_best} evaluations (best {best_val:.4f})")
                        break
                    # evaluation is not training throughput
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
        finally:
            bar.close()
        best = checkpoints.best_checkpoint(self.run_dir) if self.dist.is_main else None
        return TrainResult(self.run_dir, self.step, loss, self.last_val_loss, self.last_checkpoint, self.elapsed_s,
                           best, stopped_early)


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """Training and validation loss against steps, written atomically (a reader never sees half a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        axes.plot(*zip(*val, strict=True), label="validation", marker="o", markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        with atomic_file(out_path) as file:
            figure.savefig(file, format="png")
    finally:
        plt.close(figure)
