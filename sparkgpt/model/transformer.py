"""The decoder-only Transformer (GPT): embeddings, a stack of residual blocks, and the language-model head."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparkgpt.config import ModelConfig
from sparkgpt.model.attention import KVCache, MultiHeadAttention, causal_mask, rotary_cos_sin
from sparkgpt.model.layers import make_ffn, make_norm


class Block(nn.Module):
    """One pre-norm residual block: x = x + Attention(Norm(x)); x = x + FFN(Norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = MultiHeadAttention(config, layer_index)
        self.ffn_norm = make_norm(config)
        self.ffn = make_ffn(config)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary, mask, is_causal, cache)
        return x + self.ffn(self.ffn_norm(x))


class GPT(nn.Module):
    """Decoder-only Transformer: token ids [B, T] -> next-token logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # The output projection is the input embedding transposed: one matrix maps tokens to and from d_model.
            self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink their outputs by √(2·layers).
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layers))

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor]) -> GPT:
        """A model whose every tensor is taken from `state` (already on its device and dtype), without first
        allocating and randomly initialising its own: built on the meta device, then the tensors assigned.
        With tied embeddings `state` may omit lm_head.weight."""
        with torch.device("meta"):
            model = cls(config)
        state = dict(state)
        if config.tie_embeddings:
            state["lm_head.weight"] = state["token_embedding.weight"]
        model.load_state_dict(state, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.token_embedding.weight  # assign replaced the shared Parameter
        return model.eval()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with `last_only`).

        positions: [B, T] position of each token (default: after what the cache holds).
        attention_mask: [B, cached + T], 1 for real tokens and 0 for padding (left padding in a ragged batch).
        cache: a KVCache to read earlier keys/values from and append this step's to.
        """
        batch, seq_len = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + seq_len} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(past, past + seq_len, device=input_ids.device).expand(batch, seq_len)
        mask, is_causal = self._attention_mask(attention_mask, seq_len, past + seq_len, input_ids.device)

        x = self.token_embedding(input_ids)
        rotary = None
        if self.config.positions == "learned":
            x = x + self.position_embedding(positions)
        else:
            cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
            rotary = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.blocks:
            x = block(x, rotary, mask, is_causal, cache)
        if cache is not None:
            cache.advance(seq_len)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_norm(x))

    @staticmethod
    def _attention_mask(
        padding: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """The mask as cheaply as the case allows: (None, causal) when no key is padding, else booleans."""
        if padding is None or bool(padding.all()):
            if q_len == kv_len:
                return None, q_len > 1  # a fresh sequence: the fused kernels' own causal mask
            if q_len == 1:
                return None, False  # one new token sees the whole cache
            return causal_mask(q_len, kv_len, device), False
        visible = causal_mask(q_len, kv_len, device) & padding.bool()[:, None, None, :]
        # A padding query sees nothing; let it see itself so softmax stays finite (its output is never used).
        query_positions = torch.arange(kv_len - q_len, kv_len, device=device)
        visible |= query_positions[:, None] == torch.arange(kv_len, device=device)[None, :]
        return visible, False

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
