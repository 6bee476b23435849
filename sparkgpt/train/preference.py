"""Preference tuning by DPO (Rafailov et al. 2023): learn from pairs of replies, one preferred, without a reward model.

For a prompt x with preferred reply y_w and rejected reply y_l, the policy π (the model being trained) and a frozen
reference π_ref (the model as training starts) give each reply an implicit reward r(y) = β · log π(y|x) / π_ref(y|x);
the loss is the logistic loss of the preferred reply winning:

    loss = −log σ(r(y_w) − r(y_l))

With conservative label smoothing ε (cDPO, Mitchell 2023: each label is taken as wrong with probability ε) the loss
is −(1 − ε) · log σ(Δ) − ε · log σ(−Δ), Δ the reward margin, which stops pushing once σ(Δ) = 1 − ε. That is the sigmoid
loss of earlier TRL releases (still its CPO trainer's); TRL 1.16's DPOTrainer uses ε only in its other losses.

log π(y|x) is the sum of the log-probabilities of the reply's tokens after the prompt. With LoRA the reference is the
same model with its adapters switched off (no second copy of the weights); in full fine-tuning, a frozen copy.

Data: JSONL records {"prompt", "chosen", "rejected"}. The prompt is a string or a list of chat messages, each reply a
string or an assistant message (alone or in a one-item list, TRL's conversational form). With a chat template the
pair is rendered as a conversation (a string prompt as one user turn) and the reply is the last assistant turn with
its end-of-turn marker; without one, prompt and reply are plain text and the reply ends with end-of-text — both
exactly as `sparkgpt.data.examples` renders fine-tuning records.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sparkgpt.data.batch import pad_rows
from sparkgpt.data.examples import DataReport, FinetuneData, encode_lm_record
from sparkgpt.errors import SparkGPTError
from sparkgpt.model.lora import adapters_disabled, has_lora
from sparkgpt.tokenizer import Tokenizer
from sparkgpt.train.trainer import Trainer

FIELDS = ("prompt", "chosen", "rejected")

Tokens = tuple[list[int], list[bool]]  # token ids and, per token, whether it belongs to the reply


@dataclass
class PreferencePair:
    chosen: Tokens
    rejected: Tokens

    @property
    def ids(self) -> list[int]:
        """Every token the pair feeds the model (FinetuneData sorts micro-batches and counts tokens by these)."""
        return self.chosen[0] + self.rejected[0]


def _prompt(record: dict[str, Any], where: str) -> str | list[dict[str, Any]]:
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise SparkGPTError(f"{where}: 'prompt' is empty")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise SparkGPTError(f"{where}: 'prompt' must be a non-empty string or a non-empty list of chat messages")
    if isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        raise SparkGPTError(f"{where}: the prompt's last message is the assistant's; the reply to rate comes after "
                            "a user turn")
    return prompt


def _reply(record: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """A reply as an assistant message."""
    value = record[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        value = {"role": "assistant", "content": value}
    if not (isinstance(value, dict) and value.get("role") == "assistant" and isinstance(value.get("content"), str)):
        raise SparkGPTError(f"{where}: '{key}' must be a string or one assistant message")
    if not value["content"].strip():
        raise SparkGPTError(f"{where}: '{key}' is empty")
    return value


def _last_turn(trained: list[bool]) -> list[bool]:
    """Only the last run of trained tokens: the reply, not the assistant turns the prompt quotes."""
    end = len(trained)
    while end > 0 and not trained[end - 1]:
        end -= 1
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    return [False] * start + [True] * (end - start) + [False] * (len(trained) - end)


def encode_preference(tokenizer: Tokenizer, record: dict[str, Any], where: str) -> PreferencePair:
    """The pair's two sequences, prompt + reply, each with the mask of its reply tokens."""
    missing = [key for key in FIELDS if key not in record]
    if missing:
        found = ", ".join(sorted(record)) or "none"
        raise SparkGPTError(f"{where}: missing {', '.join(map(repr, missing))}; a preference record has 'prompt', "
                            f"'chosen' and 'rejected' (found keys: {found})")
    prompt = _prompt(record, where)
    replies = [_reply(record, key, where) for key in ("chosen", "rejected")]
    if tokenizer.chat_template is not None:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        encoded = [encode_lm_record(tokenizer, {"messages": [*turns, reply]}, where) for reply in replies]
    elif isinstance(prompt, str):
        encoded = [encode_lm_record(tokenizer, {"prompt": prompt, "completion": reply["content"]}, where)
                   for reply in replies]
    else:
        raise SparkGPTError(f"{where}: the prompt is a list of chat messages, but this model has no chat template; "
                            "give the prompt as a string")
    chosen, rejected = ((ids, _last_turn(trained)) for ids, trained in encoded)
    if not (any(chosen[1]) and any(rejected[1])):
        raise SparkGPTError(f"{where}: the chat template renders no tokens for a reply")
    return PreferencePair(chosen, rejected)


def fit_pair(pair: PreferencePair, block_size: int) -> tuple[PreferencePair, bool]:
    """(The pair within block_size tokens, whether it was cut.) The prompt loses its first tokens, by the same count
    in both sequences so both replies answer the same context, keeping at least one (which predicts the reply's
    first token); a reply that still does not fit loses its end."""
    longest = max(len(pair.chosen[0]), len(pair.rejected[0]))
    prompt = min(mask.index(True) for _, mask in (pair.chosen, pair.rejected))
    cut = max(0, min(longest - block_size, prompt - 1))
    chosen, rejected = ((ids[cut:cut + block_size], mask[cut:cut + block_size])
                        for ids, mask in (pair.chosen, pair.rejected))
    return PreferencePair(chosen, rejected), longest > block_size


class PreferenceData(FinetuneData):
    """Tokenised preference pairs, train and val, with FinetuneData's interface (split, epochs, step rows)."""

    def __init__(self, train_path: str | Path, val_path: str | Path | None, tokenizer: Tokenizer, block_size: int,
                 seed: int = 0) -> None:
        super().__init__(train_path, val_path, tokenizer, block_size, task="dpo", seed=seed)

    def _encode(self, records: list[tuple[int, dict[str, Any]]], path: Path, name: str) -> list[PreferencePair]:
        report = DataReport(name)
        pairs = []
        for number, record in records:
            pair, truncated = fit_pair(encode_preference(self.tokenizer, record, f"{path}:{number}"), self.block_size)
            report.truncated += truncated
            pairs.append(pair)
        report.examples = len(pairs)
        self.reports.append(report)
        return pairs

    def batch(self, examples: list[PreferencePair], rows: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [2B, T], completion_mask [2B, T] bool) for examples[rows]: the B chosen sequences, then the B
        rejected ones (one forward scores both, as TRL's concatenated forward), right-padded to the longest."""
        pairs = [examples[int(row)] for row in rows]
        sequences = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
        return pad_rows([ids for ids, _ in sequences], self.pad_id)[0], \
            pad_rows([mask for _, mask in sequences], 0)[0].bool()


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """log π(reply | prompt) [N] in fp32: the sum over each row's completion tokens of the log-probability of the
    token given those before it. Padding sits after a row's last token, where causal attention keeps it from
    anything real, and outside the mask."""
    logits = model(input_ids)[:, :-1].float()
    targets = input_ids[:, 1:, None]
    token_logps = logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float = 0.1, label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Mean sigmoid DPO loss, chosen rewards, rejected rewards) from sequence log-probs [B] of policy and
    reference. The rewards β · log π/π_ref are detached: they are for logging (accuracy, margin)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def frozen_reference(model: nn.Module) -> nn.Module | None:
    """The reference policy to keep beside `model` as training starts: none for a LoRA model (its base, adapters
    off, is the reference), else a frozen copy. Call it before wrapping the model (DDP, FSDP, compile)."""
    if has_lora(model):
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def reference_logps(model: nn.Module, reference: nn.Module | None, input_ids: torch.Tensor,
                    completion_mask: torch.Tensor) -> torch.Tensor:
    """log π_ref(reply | prompt) [N]: from the frozen copy, or from `model` with its adapters off."""
    if reference is not None:
        return sequence_logps(reference, input_ids, completion_mask)
    with adapters_disabled(model):
        return sequence_logps(model, input_ids, completion_mask)


def dpo_batch_loss(
    model: nn.Module, reference: nn.Module | None, input_ids: torch.Tensor, completion_mask: torch.Tensor,
    beta: float = 0.1, label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dpo_loss` of a batch as `PreferenceData.batch` lays it out (chosen rows, then rejected rows)."""
    policy = sequence_logps(model, input_ids, completion_mask)
    ref = reference_logps(model, reference, input_ids, completion_mask)
    return dpo_loss(*policy.chunk(2), *ref.chunk(2), beta=beta, label_smoothing=label_smoothing)


class PreferenceTrainer(Trainer):
    """`task: dpo`: the trainer with preference pairs for data and the DPO loss for objective, against the model as
    it starts (its base with adapters off under LoRA, else a frozen copy taken before any checkpoint is restored).
    Its validation loss is the DPO loss on held-out pairs; each evaluation also logs how often the preferred reply
    earns the higher reward and the mean reward margin."""

    def _finetune_data(self, tokenizer: Tokenizer) -> PreferenceData:
        config = self.config
        return PreferenceData(config.data, config.val_data or None, tokenizer, config.block_size, seed=config.seed)

    def _pretrained(self) -> tuple[nn.Module, Tokenizer, Any]:
        model, tokenizer, data = super()._pretrained()
        if not isinstance(data, PreferenceData):
            raise SparkGPTError(f"data {self.config.data!r}: preference tuning reads a JSONL file of {{\"prompt\", "
                                "\"chosen\", \"rejected\"}} records, not a prepared folder")
        self.reference = frozen_reference(model)
        self._margins: list[torch.Tensor] = []
        return model, tokenizer, data

    def objective(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, _, _ = dpo_batch_loss(self.train_model, self.reference, inputs, targets, self.config.dpo_beta,
                                    self.config.dpo_label_smoothing)
        return loss, loss

    def _target_count(self, targets: torch.Tensor) -> int:
        return targets.shape[0] // 2  # pairs: each weighs the same, whatever its length

    def validation_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, counted: bool
                        ) -> torch.Tensor:
        loss, chosen, rejected = dpo_batch_loss(model, self.reference, inputs, targets, self.config.dpo_beta,
                                                self.config.dpo_label_smoothing)
        if counted:
            self._margins.append(chosen - rejected)
        return loss

    def eval_metrics(self) -> dict[str, float]:
        margins = torch.cat(self._margins) if self._margins else torch.zeros(0, device=self.device)
        self._margins = []
        count = self.dist.sum(torch.tensor(float(margins.numel()), device=self.device))
        wins = self.dist.sum((margins > 0).sum().float()) / count.clamp(min=1)
        mean = self.dist.sum(margins.sum()) / count.clamp(min=1)
        return {"reward_accuracy": wins.item(), "reward_margin": mean.item()}
