"""Knowledge distillation: a small student learns a large teacher's softened next-token distribution.

    loss = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · CE(student, next tokens)

(Hinton et al., 2015: dividing by T spreads the teacher's probability over the tokens it finds plausible; T² keeps
that term's gradients on the scale of the cross-entropy's as T changes.) The student is a model preset built with
the teacher's vocabulary and trained from scratch by the trainer (config keys, checkpoints, exact resume, metrics,
DDP) on a folder prepared with the teacher's tokenizer. The teacher is frozen: in eval mode, in the training dtype,
without gradients, and never saved; a resumed run loads it again from the reference in the run's config.yaml.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from sparkgpt.checkpoint.load import load
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import GPT
from sparkgpt.tokenizer import TOKENIZER_FILE, Tokenizer
from sparkgpt.train.config import TrainConfig
from sparkgpt.train.trainer import Trainer, default_dtype


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(The distillation loss, the student's plain cross-entropy) for logits [..., V] and targets [...]. The KL is
    summed over the vocabulary and averaged over tokens, in fp32. A student vocabulary padded past the teacher's
    keeps its extra logits in its softmax; the teacher gives those tokens no probability."""
    student = student_logits.float().flatten(0, -2)
    teacher = teacher_logits.float().flatten(0, -2)
    cross_entropy = F.cross_entropy(student, targets.flatten())
    student_log_probs = F.log_softmax(student / temperature, dim=-1)[:, :teacher.shape[-1]]
    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1).mean()
    return alpha * temperature**2 * kl + (1 - alpha) * cross_entropy, cross_entropy


class DistillTrainer(Trainer):
    """The trainer with a teacher: the student (the config's `model`) is sized to its vocabulary, and each
    micro-batch's objective adds the teacher's soft targets. Evaluation stays the plain next-token loss."""

    def __init__(self, config: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        super().__init__(config, run_dir, resume=resume, progress=progress)
        self.flops_per_token += 2 * sum(p.numel() for p in self.teacher.parameters())  # its forward: 2 per weight

    def _from_scratch(self) -> tuple[torch.nn.Module, Tokenizer | None, Any]:
        config = self.config
        dtype = default_dtype(self.device) if config.dtype == "auto" else config.dtype  # the student's is timed later
        teacher, teacher_tokenizer = load(config.teacher, dtype=dtype, device=self.device)
        if not isinstance(teacher, GPT):
            raise SparkGPTError(f"teacher {config.teacher!r}: distillation needs a decoder (GPT) model; this one is "
                                f"{teacher.config.architecture!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_tokenizer = teacher_tokenizer
        teacher_vocab = self.teacher.config.vocab_size
        student_vocab = config.model_overrides.get("vocab_size", teacher_vocab)
        if student_vocab < teacher_vocab:
            raise SparkGPTError(f"student vocab_size {student_vocab} is smaller than the teacher's ({teacher_vocab}, "
                                f"{config.teacher}); the student needs a logit for every teacher token")
        if config.block_size > self.teacher.config.max_seq_len:
            raise SparkGPTError(f"config key 'block_size' ({config.block_size}) exceeds the teacher's max_seq_len "
                                f"({self.teacher.config.max_seq_len})")
        # Saved in the run's config.yaml: a resumed run builds the same student without asking the teacher first.
        self.config = dataclasses.replace(
            config, model_overrides={**config.model_overrides, "vocab_size": student_vocab})
        student, tokenizer, data = super()._from_scratch()
        if self.dist.is_main and self.progress:
            tqdm.write(f"distilling {config.teacher} ({_millions(self.teacher)} parameters) into "
                       f"{config.model} ({_millions(student)}), T={config.distill_temperature}, "
                       f"alpha={config.distill_alpha}")
        return student, tokenizer, data

    def _check_fits(self, model_config: Any, data: Any) -> None:
        """The data must be token ids of the teacher's tokenizer (else its soft targets are about other tokens)."""
        teacher_vocab = self.teacher.config.vocab_size
        tokenizer_path = data.directory / TOKENIZER_FILE
        mismatch = data.vocab_size > teacher_vocab
        if not mismatch and self.teacher_tokenizer is not None and tokenizer_path.is_file():
            mismatch = Tokenizer.from_dir(data.directory).backend.get_vocab() != \
                self.teacher_tokenizer.backend.get_vocab()
        if mismatch:
            raise SparkGPTError(
                f"{data.directory}: prepared with a tokenizer of {data.vocab_size:,} tokens that is not the teacher's "
                f"({self.config.teacher}, {teacher_vocab:,}); prepare it with --tokenizer {self.config.teacher}")
        super()._check_fits(model_config, data)

    def objective(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return distillation_loss(self.train_model(inputs), teacher_logits, targets, self.config.distill_temperature,
                                 self.config.distill_alpha)


def _millions(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
