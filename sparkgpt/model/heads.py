"""Task heads on a decoder: sequence classification (transformers' *ForSequenceClassification, Llama-style)."""

from __future__ import annotations

import torch
from torch import nn

from sparkgpt.config import ModelConfig
from sparkgpt.model.transformer import GPT


class SequenceClassifier(nn.Module):
    """Scores over `labels` for each text: score(h_last), h_last the final vector of the text's last real token.

    Under causal attention only the last token has seen the whole text, so it stands for the sequence (as in
    GPT-1's fine-tuning and transformers' LlamaForSequenceClassification, whose `score` layer this is). The
    decoder's language-model head is kept (so the checkpoint stays a loadable LM) but unused.
    """

    def __init__(self, backbone: GPT, labels: list[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.labels = list(labels)
        weight = backbone.token_embedding.weight
        self.score = nn.Linear(backbone.config.d_model, len(labels), bias=False, device=weight.device,
                               dtype=weight.dtype)
        nn.init.normal_(self.score.weight, std=backbone.config.initializer_range)
        if not backbone.config.tie_embeddings:
            backbone.lm_head.weight.requires_grad_(False)  # never reached by the loss (DDP needs every trained
            # parameter to get a gradient)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_labels] for right-padded ids [B, T] whose real tokens number `lengths` [B]."""
        hidden = self.backbone.hidden_states(input_ids)
        last = hidden[torch.arange(len(input_ids), device=hidden.device), lengths.to(hidden.device) - 1]
        return self.score(last.to(self.score.weight.dtype))  # an fp32 head may sit on a bf16 decoder

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
