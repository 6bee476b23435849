"""Vision Transformers: ViT (Dosovitskiy et al. 2020) and CLIP's image–text dual encoder (Radford et al. 2021).

An image is cut into p × p patches, each patch a token:

    x = [c; Conv2d_{kernel p, stride p}(image) flattened] + P     c: a learned class token, P: learned positions
    h = Blocks(Norm₀(x))                                        pre-norm, bidirectional; Norm₀ only in CLIP
    ViT:  last = Norm(h),  pooled = tanh(last[:, 0] W + b)      (the pooler, when the checkpoint has one)
    CLIP: last = h,        pooled = Norm(h[:, 0])

CLIP's text tower is a causal pre-norm stack over token and learned position embeddings, read at the
end-of-text token; both towers' vectors are projected (no bias) into one space, where

    logits = exp(s) · cos(image, text)        s: the learned `logit_scale`

An image-to-text model (transformers' VisionEncoderDecoderModel with a ViT encoder and a GPT-2 decoder) answers or
captions an image: the ViT's vectors are the memory a decoder with cross-attention reads,

    memory = Norm(Blocks(PatchEmbed(image)))      logits = Decoder(E[prompt; answer] + P, memory) Eᵀ

which is the existing EncoderDecoder with the patch embedding in place of the source tokens.

The blocks are the shared `Block`s of `transformer.py` (pre-LayerNorm, biases, exact GELU for ViT, quick GELU for
CLIP); only the patch embedding and the poolings are new here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from sparkgpt.config import ImageTextConfig, ModelConfig, check_image_fields
from sparkgpt.data.images import vit_preprocessing
from sparkgpt.errors import SparkGPTError
from sparkgpt.model.layers import make_norm
from sparkgpt.model.transformer import GPT, Block, Embeddings, EncoderDecoder, _StackModel

# What every vision tower shares; the sizes, and the few choices ViT and CLIP differ in, come from the checkpoint.
VISION_FIXED: dict[str, Any] = dict(
    architecture="encoder", positions="learned", norm="layernorm", bias=True, norm_position="pre",
    type_vocab_size=0, tie_embeddings=False, vocab_size=1,  # no tokens: patches are embedded by a convolution
)


@dataclass
class VisionConfig(ModelConfig):
    """A ModelConfig (the blocks' shape) with the image front end and the pooling. `max_seq_len` is derived: the
    patches plus the class token. `embedding_norm` is CLIP's norm before the blocks; `final_norm` ViT's after."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    patch_bias: bool = True            # a bias on the patch convolution (ViT; CLIP has none)
    pooler_size: int | None = None     # ViT's pooler: tanh(W h_cls + b) of this width; None: no pooler
    pooled_norm: bool = False          # CLIP: the class token's vector, normalised, is the pooled output

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int) and isinstance(self.patch_size, int) and self.patch_size > 0:
            self.max_seq_len = (self.image_size // self.patch_size) ** 2 + 1
        super().__post_init__()

    def validate(self) -> None:
        check_image_fields(self)
        super().validate()
        if self.architecture != "encoder" or self.norm_position != "pre":
            raise SparkGPTError("a vision config needs architecture 'encoder' with norm_position 'pre', not "
                                f"{self.architecture!r} with {self.norm_position!r}")
        size = self.pooler_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise SparkGPTError(f"config field 'pooler_size' is {size!r}; expected a positive integer or None")

    def replace(self, **changes: Any) -> VisionConfig:
        return VisionConfig.from_dict({**self.to_dict(), **changes})


def vision_config(**values: Any) -> VisionConfig:
    """A VisionConfig of the given sizes and choices with what every vision tower shares."""
    return VisionConfig.from_dict({**VISION_FIXED, **values}, source="vision config")


class VisionOutput(NamedTuple):
    last_hidden_state: torch.Tensor    # [B, 1 + patches, d]
    pooler_output: torch.Tensor | None  # [B, d] (CLIP), [B, pooler_size] (ViT's pooler) or None


class PatchEmbeddings(nn.Module):
    """Pixels [B, C, H, W] -> [class token; one vector per patch] + positions: [B, 1 + patches, d]."""

    def __init__(self, d_model: int, image_size: int, patch_size: int, num_channels: int, bias: bool,
                 initializer_range: float) -> None:
        super().__init__()
        self.expected = [num_channels, image_size, image_size]
        self.patch_proj = nn.Conv2d(num_channels, d_model, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.cls_token = nn.Parameter(torch.empty(d_model))
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, d_model)
        nn.init.normal_(self.cls_token, std=initializer_range)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or list(pixel_values.shape[1:]) != self.expected:
            raise SparkGPTError(f"expected pixel values [batch, {', '.join(map(str, self.expected))}], got "
                                f"{list(pixel_values.shape)}")
        patches = self.patch_proj(pixel_values.to(self.patch_proj.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


def patch_embeddings(config: VisionConfig) -> PatchEmbeddings:
    return PatchEmbeddings(config.d_model, config.image_size, config.patch_size, config.num_channels,
                           config.patch_bias, config.initializer_range)


class ViT(_StackModel):
    """Vision Transformer: pixels [B, C, image_size, image_size] -> VisionOutput (every token's vector, and the
    pooled image vector). With `embedding_norm`, `pooled_norm` and quick GELU it is CLIP's vision tower."""

    config: VisionConfig

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = patch_embeddings(config)
        if config.embedding_norm:
            self.embedding_norm = make_norm(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        if config.final_norm:
            self.final_norm = make_norm(config)
        if config.pooled_norm:
            self.pooled_norm = make_norm(config)
        if config.pooler_size is not None:
            self.pooler = nn.Linear(config.d_model, config.pooler_size)
        self.init_weights()

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        x = self.embeddings(pixel_values)
        if self.config.embedding_norm:
            x = self.embedding_norm(x)
        for block in self.blocks:
            x = block(x, None, None, False, None)
        if self.config.final_norm:
            x = self.final_norm(x)
        pooled = None
        if self.config.pooled_norm:
            pooled = self.pooled_norm(x[:, 0])
        elif self.config.pooler_size is not None:
            pooled = torch.tanh(self.pooler(x[:, 0]))
        return VisionOutput(x, pooled)


class TextTransformer(_StackModel):
    """CLIP's text tower: token ids [B, T] -> vectors [B, T, d] after causal pre-norm blocks and a final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attention_mask: [B, T], 1 for real tokens and 0 for padding."""
        batch, length = input_ids.shape
        if length > self.config.max_seq_len:
            raise SparkGPTError(f"a text of {length} tokens exceeds the text tower's {self.config.max_seq_len}")
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        x, _ = self.embeddings(input_ids, positions)
        mask, is_causal = GPT._attention_mask(attention_mask, length, length, input_ids.device)
        for block in self.blocks:
            x = block(x, None, mask, is_causal, None)
        return self.final_norm(x)


@dataclass
class CLIPConfig:
    """The two towers, the width of the space they are projected into, and where a text is read: at its first
    end-of-text token (`text.eos_token_id`), or, as configs written before transformers 4.31 ask (eos_token_id
    2), at its largest token id."""

    text: ModelConfig
    vision: VisionConfig
    projection_dim: int = 512
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), the paper's initial temperature
    text_pooling: Literal["eos", "argmax"] = "eos"

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = ModelConfig.from_dict(self.text, source="CLIP text config")
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision, source="CLIP vision config")
        self.validate()

    def validate(self) -> None:
        dim = self.projection_dim
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise SparkGPTError(f"config field 'projection_dim' is {dim!r}; expected a positive integer")
        if self.text_pooling not in ("eos", "argmax"):
            raise SparkGPTError(f"config field 'text_pooling' is {self.text_pooling!r}; expected 'eos' or 'argmax'")
        eos = self.text.eos_token_id
        if self.text_pooling == "eos" and (not isinstance(eos, int) or not 0 <= eos < self.text.vocab_size):
            raise SparkGPTError(f"config field 'eos_token_id' of the text tower is {eos!r}; reading a text at its "
                                f"end needs one token id below vocab_size {self.text.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "CLIP config") -> CLIPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SparkGPTError(f"{source}: unknown config field(s) {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(known))}")
        return cls(**values)


class CLIPOutput(NamedTuple):
    logits_per_image: torch.Tensor  # [images, texts]: exp(s) · cosine similarity
    logits_per_text: torch.Tensor   # [texts, images]
    image_embeds: torch.Tensor      # [images, projection_dim], unit length
    text_embeds: torch.Tensor       # [texts, projection_dim], unit length


class CLIP(nn.Module):
    """Images and texts into one space: `get_image_features`, `get_text_features`, and `forward`, the image–text
    logits (transformers' CLIPModel)."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = ViT(config.vision)
        self.text = TextTransformer(config.text)
        self.visual_projection = nn.Linear(config.vision.d_model, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.d_model, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        for projection in (self.visual_projection, self.text_projection):
            nn.init.normal_(projection.weight, std=config.text.initializer_range)

    @classmethod
    def from_state_dict(cls, config: CLIPConfig, state: dict[str, torch.Tensor]) -> CLIP:
        """Built on the meta device, then every tensor assigned from `state` (already on its device and dtype)."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        return model.eval()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, C, H, W] -> image vectors [B, projection_dim] (not normalised)."""
        return self.visual_projection(self.vision(pixel_values).pooler_output)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T], each with its end-of-text token -> text vectors [B, projection_dim] (not normalised)."""
        hidden = self.text(input_ids, attention_mask)
        return self.text_projection(hidden[torch.arange(len(input_ids), device=hidden.device),
                                           self.text_end(input_ids)])

    def text_end(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The position [B] each text is read at: its first end-of-text token, or its largest id (old configs)."""
        if self.config.text_pooling == "argmax":
            return input_ids.argmax(dim=-1)
        is_end = input_ids == self.config.text.eos_token_id
        if not bool(is_end.any(dim=-1).all()):
            rows = (~is_end.any(dim=-1)).nonzero().flatten().tolist()
            raise SparkGPTError(f"text row(s) {rows} have no end-of-text token (id {self.config.text.eos_token_id}),"
                                " where CLIP reads a text")
        return is_end.int().argmax(dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> CLIPOutput:
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        logits_per_text = text @ image.t() * self.logit_scale.exp()
        return CLIPOutput(logits_per_text.t(), logits_per_text, image, text)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D positions [grid², dim] of a grid × grid patch grid (row-major): sines and cosines of the column
    then of the row, dim / 4 frequencies each (dim a multiple of 4), geometric from 1 to 1/10,000 (as MAE and
    "Better plain ViT baselines")."""
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                   indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    x, y = columns.flatten()[:, None] * omega, rows.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


# ---- image-to-text ----------------------------------------------------------------------------------------

class ImageText(EncoderDecoder):
    """Pixels [B, C, image_size, image_size] and target ids [B, T] -> next-token logits [B, T, vocab]: a ViT
    encoder (patch embedding, `n_encoder_layers` blocks, a final norm) whose vectors the decoder attends to."""

    config: ImageTextConfig

    def __init__(self, config: ImageTextConfig) -> None:
        super().__init__(config)
        self.patch_embeddings = PatchEmbeddings(config.d_model, config.image_size, config.patch_size,
                                                config.num_channels, True, config.initializer_range)
        self.patch_embeddings.apply(self._init_weights)
        # Beyer et al. 2022 ("Better plain ViT baselines"): 2-D sine-cosine positions help a ViT trained from
        # scratch on little data; they start learnable here, so the checkpoint stays a ViT's.
        if config.d_model % 4 == 0:
            with torch.no_grad():
                positions = self.patch_embeddings.position_embedding.weight
                positions[0] = 0.0
                positions[1:] = sincos_2d(config.image_size // config.patch_size, config.d_model)
        # How an image becomes pixels for this model (a checkpoint's preprocessor_config.json replaces it): ViT's
        # defaults at this model's size.
        self.preprocessing = vit_preprocessing(config.image_size)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Pixels [B, C, H, W] -> memory [B, 1 + patches, d_model] (every position is real: no mask)."""
        return self.encoder_stack(self.patch_embeddings(pixel_values))

    def forward(self, pixel_values: torch.Tensor, target_ids: torch.Tensor,  # type: ignore[override]
                image_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits [B, T, vocab] for every target position at once. `image_rows` [B] gives each
        target row's image among `pixel_values` (several questions about one image encode it once)."""
        memory = self.encode(pixel_values)
        if image_rows is not None:
            memory = memory[image_rows]
        return self.decode(target_ids, self.memory_kv(memory))


__all__ = [
    "CLIP",
    "VISION_FIXED",
    "CLIPConfig",
    "CLIPOutput",
    "ImageText",
    "PatchEmbeddings",
    "TextTransformer",
    "ViT",
    "VisionConfig",
    "VisionOutput",
    "vision_config",
]
