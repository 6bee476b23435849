"""The decoder-only Transformer (GPT): embeddings, a stack of residual blocks, and the language-model head."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.model.attention import (
    CrossAttention,
    KVCache,
    MultiHeadAttention,
    RelativePositionBias,
    causal_mask,
    rotary_cos_sin,
)
from sparkgpt.model.layers import MixtureOfExperts, make_ffn, make_norm, softcap
from sparkgpt.model.sparse import position_mask


class Block(nn.Module):
    """One residual block. Pre-norm (GPT-2, Llama): x = x + Attention(Norm(x)); x = x + FFN(Norm(x)).
    Post-norm (BERT, the 2017 paper; `norm_position="post"`): x = Norm(x + Attention(x)); x = Norm(x + FFN(x)).

    The attention pattern of the layer and the FFN (dense or mixture of experts) come from the config. A decoder
    block of an encoder–decoder (`cross_attention`) has a third sub-layer between them that attends to the
    encoder's output: x = x + CrossAttention(Norm(x), memory) (pre-norm) or Norm(x + CrossAttention(x, memory)).
    """

    def __init__(self, config: ModelConfig, layer_index: int, cross_attention: bool = False) -> None:
        super().__init__()
        pattern = config.layer_patterns()[layer_index] if config.architecture == "decoder" else "dense"
        self.attn_norm = make_norm(config)
        self.attn = MultiHeadAttention(config, layer_index, pattern)
        if cross_attention:
            self.cross_norm = make_norm(config)
            self.cross_attn = CrossAttention(config, layer_index)
        self.ffn_norm = make_norm(config)
        self.ffn = make_ffn(config)
        self.post_norm = config.norm_position == "post"
        if config.sandwich_norm:  # x = x + Norm(Attention(Norm(x))): each sub-layer's output is normalised too
            self.attn_post_norm, self.ffn_post_norm = make_norm(config), make_norm(config)
        self.sandwich = config.sandwich_norm

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x, rotary, mask, is_causal, cache))
            if memory_kv is not None:
                x = self.cross_norm(x + self.cross_attn(x, memory_kv, memory_mask))
            return self.ffn_norm(x + self.ffn(x))
        attended = self.attn(self.attn_norm(x), rotary, mask, is_causal, cache)
        x = x + (self.attn_post_norm(attended) if self.sandwich else attended)
        if memory_kv is not None:
            x = x + self.cross_attn(self.cross_norm(x), memory_kv, memory_mask)
        fed = self.ffn(self.ffn_norm(x))
        return x + (self.ffn_post_norm(fed) if self.sandwich else fed)


class GPT(nn.Module):
    """Decoder-only Transformer: token ids [B, T] -> next-token logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        add_embeddings(self, config)  # on GPT itself, so its names stay token_embedding.weight, position_embedding...
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        if config.final_norm:
            self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # The output projection is the input embedding transposed: one matrix maps tokens to and from d_model.
            self.lm_head.weight = self.token_embedding.weight
        self.init_weights()
        # Decided here, never per step: whether any layer has a sparse pattern, and whether any routes to experts.
        self.sparse = any(pattern != "dense" for pattern in config.layer_patterns())
        self.aux_loss: torch.Tensor | None = None  # the load-balancing loss of the last forward (MoE models)

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

    def init_weights(self) -> None:
        """GPT-2's initialisation of every weight matrix (also applied after building on the meta device)."""
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink their outputs by √(2·layers).
        std = self.config.initializer_range / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with `last_only`): the language-model head over `hidden_states`,
        which takes the same keyword options (positions, attention_mask, cache, last_only); soft-capped with
        `final_logit_softcap`."""
        logits = self.lm_head(self.hidden_states(input_ids, **options))
        cap = self.config.final_logit_softcap
        return logits if cap is None else softcap(logits, cap)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The last block's vectors [B, T, d_model], normalised if `final_norm` (or [B, 1, d_model] with `last_only`).

        positions: [B, T] position of each token (default: after what the cache holds).
        attention_mask: [B, cached + T], 1 for real tokens and 0 for padding (left padding in a ragged batch);
            or a ready boolean mask [B, 1, T, cached + T], True where a query may see a key, used as is (the serving
            engine's slots each end at their own cache column, which no padding mask can say).
        cache: a KVCache to read earlier keys/values from and append this step's to.
        """
        batch, seq_len = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + seq_len} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(past, past + seq_len, device=input_ids.device).expand(batch, seq_len)
        mask, is_causal = self._attention_mask(attention_mask, seq_len, past + seq_len, input_ids.device)

        x, rotary = embed(self, input_ids, positions)
        rotaries = [rotary] * len(self.blocks)
        if self.config.rope_local_theta is not None:  # local layers turn at their own base, without scaling
            cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_local_theta)
            local = cos.to(x.dtype), sin.to(x.dtype)
            rotaries = [local if p == "local" else rotary for p in self.config.layer_patterns()]
        if self.sparse:
            layer_masks = self._pattern_masks(mask, is_causal, positions, attention_mask, cache)
            for block, layer_rotary, (layer_mask, layer_causal) in zip(self.blocks, rotaries, layer_masks,
                                                                       strict=True):
                x = block(x, layer_rotary, layer_mask, layer_causal, cache)
        else:
            for block, layer_rotary in zip(self.blocks, rotaries, strict=True):
                x = block(x, layer_rotary, mask, is_causal, cache)
        if self.config.n_experts:
            self.aux_loss = load_balancing_loss([block.ffn for block in self.blocks])
        if cache is not None:
            cache.advance(seq_len)
        if last_only:
            x = x[:, -1:]
        return self.final_norm(x) if self.config.final_norm else x

    def _pattern_masks(
        self, mask: torch.Tensor | None, is_causal: bool, positions: torch.Tensor, padding: torch.Tensor | None,
        cache: KVCache | None,
    ) -> list[tuple[torch.Tensor | None, bool]]:
        """(mask, is_causal) for each layer. Dense layers keep the model's. A sparse layer gets (None, True) for a
        whole causal sequence, which its fast path takes; with a cache or padding, a mask built from the token
        positions of its queries and of the keys it will see (a windowed layer sees its ring)."""
        config, seq_len = self.config, positions.shape[1]
        patterns = config.layer_patterns()
        if cache is None and (padding is None or bool(padding.all())):
            return [(mask, is_causal) if p == "dense" else (None, seq_len > 1) for p in patterns]
        if padding is not None and padding.dim() == 4:
            raise SparkGPTError("a ready 4-d attention mask cannot be combined with sparse attention patterns")
        valid = padding[:, -seq_len:].bool() if padding is not None else torch.ones_like(positions, dtype=torch.bool)
        new_positions = positions.masked_fill(~valid, -1)
        if cache is None:
            full = window = new_positions, torch.arange(seq_len, device=positions.device)
        else:
            cache.record_positions(new_positions)
            full, window = cache.full_key_positions(), cache.window_key_positions()
        masks = {}
        for pattern in set(patterns) - {"dense"}:
            keys, self_index = window if pattern == "local" else full
            masks[pattern] = position_mask(pattern, positions, keys, self_index, config.attention_window,
                                           config.fixed_summary)
        return [(mask, is_causal) if p == "dense" else (masks[p], False) for p in patterns]

    @staticmethod
    def _attention_mask(
        padding: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """The mask as cheaply as the case allows: (None, causal) when no key is padding, else booleans."""
        if padding is not None and padding.dim() == 4:
            return padding.bool(), False
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


def load_balancing_loss(ffns: list[MixtureOfExperts]) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss over every MoE layer of the last forward, as Mixtral computes it:
    aux = E · Σ_e f_e · P_e, f_e = assignments to expert e / N and P_e = Σ router probability of e / N, with N the
    tokens of all layers together (f sums to k). Perfectly balanced routing gives k; the trainer adds
    `router_aux_loss_coef` × aux to the language-model loss."""
    counts = sum(ffn.router_stats[0] for ffn in ffns)
    probs = sum(ffn.router_stats[1] for ffn in ffns)
    n_tokens = sum(ffn.router_stats[2] for ffn in ffns)
    return len(counts) * torch.sum(counts / n_tokens * probs / n_tokens)


# ---- embeddings: one definition for every model kind -----------------------------------------------------------

def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)): positions [B, T] -> [B, T, d]."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    angles = positions.float()[..., None] * inv_freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def add_embeddings(module: nn.Module, config: ModelConfig, norm_name: str = "embedding_norm") -> None:
    """Give `module` the embedding layers `config` asks for, under the names `embed` reads: token_embedding,
    position_embedding (learned positions), token_type_embedding (`type_vocab_size`) and, with `embedding_norm`,
    a norm named `norm_name`. GPT holds them itself (its checkpoint names: token_embedding.weight, ...); the
    encoder models hold them in an `Embeddings` (embeddings.token_embedding.weight, ..., embeddings.norm.*)."""
    module.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
    if config.positions == "learned":
        module.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)
    if config.type_vocab_size:
        module.token_type_embedding = nn.Embedding(config.type_vocab_size, config.d_model)
    if config.embedding_norm:
        setattr(module, norm_name, make_norm(config))


def embed(
    module: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None,
    norm_name: str = "embedding_norm",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Token ids [B, T] at `positions` [B, T] -> (vectors [B, T, d], rotary cos/sin or None), through the layers
    `add_embeddings` gave `module`:

        x = E[token] (× √d_model with `scale_embeddings`) + P[position] + T[token type], then Norm(x) if
        `embedding_norm` (BERT),

    with P learned (GPT-2, BERT), sinusoidal (the 2017 paper), or absent for rotary positions, which turn q and k
    inside attention instead (the cos/sin returned here), and for T5's relative positions, a bias on the attention
    scores (`RelativePositionBias`)."""
    config = module.config
    x = module.token_embedding(input_ids)
    if config.scale_embeddings:
        x = x * math.sqrt(config.d_model)  # the 2017 paper: E, shared with the output layer, is small beside ±1 sines
    rotary = None
    if config.positions == "learned":
        x = x + module.position_embedding(positions)
    elif config.positions == "sinusoidal":
        x = x + sinusoidal_positions(positions, config.d_model).to(x.dtype)
    elif config.positions == "rope":
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, config.rope_scaling)
        rotary = cos.to(x.dtype), sin.to(x.dtype)
    if config.type_vocab_size:
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)  # all sentence A
        x = x + module.token_type_embedding(types)
    if config.embedding_norm:
        x = getattr(module, norm_name)(x)
    return x, rotary


class Embeddings(nn.Module):
    """The encoder models' embedding layers (`add_embeddings`, the norm named `norm` as in BERT's checkpoints), and
    their computation (`embed`): (vectors [B, T, d], rotary cos/sin or None)."""

    NORM = "norm"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        add_embeddings(self, config, self.NORM)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        return embed(self, input_ids, positions, token_type_ids, self.NORM)


# ---- encoder-only (BERT) and encoder–decoder (the original Transformer) ---------------------------------------

def _padding_mask(padding: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] (1 real, 0 padding) -> [B, 1, 1, S] booleans for attention, or None when nothing is padding."""
    if padding is None or bool(padding.all()):
        return None
    return padding.bool()[:, None, None, :]


def _check_length(config: ModelConfig, length: int) -> None:
    if length > config.max_seq_len:
        raise SparkGPTError(f"sequence of {length} tokens exceeds max_seq_len {config.max_seq_len}")


class _StackModel(nn.Module):
    """What the encoder and the encoder–decoder share with GPT: initialisation and loading from a state dict."""

    config: ModelConfig

    def init_weights(self) -> None:
        self.apply(self._init_weights)
        layers = self.config.n_layers + (self.config.n_encoder_layers or 0)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * layers))

    def _init_weights(self, module: nn.Module) -> None:
        GPT._init_weights(self, module)  # type: ignore[arg-type]

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
        """As GPT.from_state_dict: built on the meta device, then every tensor assigned from `state`."""
        with torch.device("meta"):
            model = cls(config)
        state = dict(state)
        tied = config.tie_embeddings and hasattr(model, "lm_head")
        if tied:
            state["lm_head.weight"] = state["embeddings.token_embedding.weight"]
        model.load_state_dict(state, assign=True)
        if tied:
            model.lm_head.weight = model.embeddings.token_embedding.weight
        return model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Encoder(_StackModel):
    """Encoder-only Transformer (BERT): token ids [B, T] -> contextual vectors [B, T, d_model].

    Every token attends to every other (bidirectional self-attention; padding is masked out); BERT's blocks are
    post-norm with a norm after the embeddings. `sentence_embeddings` mean-pools the vectors of the real tokens
    and normalises them (sentence-transformers' recipe for MiniLM)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        if config.final_norm:
            self.final_norm = make_norm(config)
        self.init_weights()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attention_mask: [B, T], 1 for real tokens and 0 for padding."""
        batch, length = input_ids.shape
        _check_length(self.config, length)
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        x, rotary = self.embeddings(input_ids, positions, token_type_ids)
        mask = _padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, rotary, mask, False, None)
        return self.final_norm(x) if self.config.final_norm else x

    def sentence_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the real tokens' vectors, L2-normalised: [B, d_model]."""
        hidden = self(input_ids, attention_mask)
        weights = attention_mask.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


class EncoderDecoder(_StackModel):
    """The original Transformer (Vaswani et al. 2017): source ids [B, S] and target ids [B, T] -> next-target-token
    logits [B, T, vocab].

    One embedding matrix serves source, target and the output projection. The encoder is a stack of
    bidirectional blocks; each decoder block adds, between masked self-attention and the FFN, attention to the
    encoder's output (the memory). Post-norm or pre-norm is `norm_position`; like torch.nn.Transformer each stack
    ends with a norm when `final_norm`. Generation runs the encoder once, projects the memory's keys and values
    once per layer (`memory_kv`), and decodes with the KV cache. T5 (`positions="relative"`) has no position
    vectors: each stack adds its learned bias of key-minus-query distance to the scores of all its layers.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder_blocks = nn.ModuleList(Block(config, i) for i in range(config.n_encoder_layers))
        self.blocks = nn.ModuleList(Block(config, i, cross_attention=True) for i in range(config.n_layers))
        if config.final_norm:
            self.encoder_norm = make_norm(config)
            self.final_norm = make_norm(config)
        if config.positions == "relative":  # T5: each stack's bias of key-minus-query distance, shared by its layers
            self.encoder_position_bias = RelativePositionBias(config, bidirectional=True)
            self.position_bias = RelativePositionBias(config, bidirectional=False)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embeddings.token_embedding.weight
        self.init_weights()

    # -- the stacks, on vectors (what torch.nn.Transformer computes) --

    def encoder_stack(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                      rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Source vectors [B, S, d] -> memory [B, S, d]; mask [B, 1, 1, S] booleans (True: a real token), or the
        float mask added to the scores (T5's position bias)."""
        for block in self.encoder_blocks:
            x = block(x, rotary, mask, False, None)
        return self.encoder_norm(x) if self.config.final_norm else x

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's keys and values of the memory."""
        return [block.cross_attn.project_memory(memory) for block in self.blocks]

    def decoder_stack(
        self, y: torch.Tensor, memory_kv: list[tuple[torch.Tensor, torch.Tensor]], memory_mask: torch.Tensor | None,
        cache: KVCache | None = None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Target vectors [B, T, d] -> [B, T, d]: masked self-attention (through the cache, when given),
        attention to the memory, FFN."""
        past = cache.length if cache is not None else 0
        length = y.shape[1]
        if past == 0:
            mask, is_causal = None, length > 1
        else:
            mask, is_causal = (None if length == 1 else causal_mask(length, past + length, y.device)), False
        if self.config.positions == "relative":  # T5: the bias on every score, the future at -inf
            mask = self.position_bias(length, past + length, causal_mask(length, past + length, y.device))
            is_causal = False
        for block, kv in zip(self.blocks, memory_kv, strict=True):
            y = block(y, rotary, mask, is_causal, cache, kv, memory_mask)
        return self.final_norm(y) if self.config.final_norm else y

    # -- token ids --

    def encode(self, source_ids: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids [B, S] (right-padded; source_mask [B, S] 1 real, 0 padding) -> memory [B, S, d]."""
        batch, length = source_ids.shape
        _check_length(self.config, length)
        positions = torch.arange(length, device=source_ids.device).expand(batch, length)
        x, rotary = self.embeddings(source_ids, positions)
        mask = _padding_mask(source_mask)
        if self.config.positions == "relative":
            mask = self.encoder_position_bias(length, length, mask)
        return self.encoder_stack(x, mask, rotary)

    def decode(
        self, target_ids: torch.Tensor, memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        source_mask: torch.Tensor | None = None, cache: KVCache | None = None, last_only: bool = False,
    ) -> torch.Tensor:
        """Next-token logits [B, T, vocab] for target ids [B, T] that follow what the cache holds."""
        batch, length = target_ids.shape
        past = cache.length if cache is not None else 0
        _check_length(self.config, past + length)
        positions = torch.arange(past, past + length, device=target_ids.device).expand(batch, length)
        y, rotary = self.embeddings(target_ids, positions)
        y = self.decoder_stack(y, memory_kv, _padding_mask(source_mask), cache, rotary)
        if cache is not None:
            cache.advance(length)
        if last_only:
            y = y[:, -1:]
        if self.config.scale_decoder_output:  # T5: its tied head reads the embedding matrix at a 1/√d_model scale
            y = y * self.config.d_model ** -0.5
        return self.lm_head(y)

    def forward(
        self, source_ids: torch.Tensor, target_ids: torch.Tensor, source_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher forcing: logits [B, T, vocab] for every target position at once."""
        return self.decode(target_ids, self.memory_kv(self.encode(source_ids, source_mask)), source_mask)


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The model an architecture builds: GPT, Encoder or EncoderDecoder."""
    return {"decoder": GPT, "encoder": Encoder, "encoder-decoder": EncoderDecoder}[config.architecture]

