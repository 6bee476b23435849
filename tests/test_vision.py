"""ViT and CLIP against transformers: tiny random `ViTModel` (with and without its pooler) and `CLIPModel`
checkpoints load with fp32 outputs within 1e-4, save back for transformers to read with the same outputs, and the
image preprocessing equals transformers' ViT and CLIP image processors (their PIL backend) on generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparkgpt.checkpoint import load as checkpoint_load
from sparkgpt.checkpoint import vision
from sparkgpt.data.images import (
    CLIP_PREPROCESSING,
    VIT_PREPROCESSING,
    ImagePreprocessing,
    preprocess_image,
    preprocess_images,
)
from sparkgpt.errors import SparkGPTError
from sparkgpt.model.vision import CLIP, ViT, vision_config

transformers = pytest.importorskip("transformers")

IMAGE, PATCH = 32, 8


def spread(model: torch.nn.Module) -> torch.nn.Module:
    """Weights of a size that makes every part count: transformers' init leaves norms at 1 and 0, the class token
    and positions near 0, so a wrong norm or a lost position would hide under 1e-4."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "logit_scale":
                param.copy_(torch.randn(param.shape, generator=generator) * (0.5 if "norm" in name else 0.2)
                            + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def vit_reference(directory: Path, pooler: bool, **config):
    torch.manual_seed(0)
    hf_config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, image_size=IMAGE, patch_size=PATCH, **config)
    reference = spread(transformers.ViTModel(hf_config, add_pooling_layer=pooler))
    reference.save_pretrained(directory)
    return reference


def clip_reference(directory: Path, eos_token_id: int = 98):
    torch.manual_seed(0)
    hf_config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
                         bos_token_id=97, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=PATCH),
        projection_dim=24, logit_scale_init_value=1.5)
    reference = spread(transformers.CLIPModel(hf_config))
    reference.save_pretrained(directory)
    return reference


def texts(eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three texts of 12 positions: lengths 12, 7 and 4, right-padded with 0 after their end-of-text token; the
    second also holds an earlier one (the first is where transformers reads it)."""
    ids = torch.randint(3, 90, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row, length in enumerate((12, 7, 4)):
        ids[row, length - 1] = eos
        ids[row, length:], mask[row, length:] = 0, 0
    ids[1, 2] = eos
    return ids, mask


@pytest.mark.parametrize(("pooler", "qkv_bias", "act"), [(True, True, "gelu"), (False, False, "gelu_new")])
def test_random_vit_loads_with_equal_hidden_states_and_pooled_output(tmp_path, pooler, qkv_bias, act):
    reference = vit_reference(tmp_path / "vit", pooler, qkv_bias=qkv_bias, hidden_act=act)
    model, tokenizer = checkpoint_load.load(tmp_path / "vit", device="cpu")
    assert isinstance(model, ViT) and tokenizer is None
    assert model.config.ffn == ("gelu_exact" if act == "gelu" else "gelu")
    with torch.no_grad():
        theirs, ours = reference(pixels()), model(pixels())
    close(ours.last_hidden_state, theirs.last_hidden_state)
    if pooler:
        close(ours.pooler_output, theirs.pooler_output)
    else:
        assert ours.pooler_output is None and theirs.pooler_output is None


@pytest.mark.parametrize("eos_token_id", [50, 2])
def test_random_clip_loads_with_equal_features_and_logits(tmp_path, eos_token_id):
    """Texts are read at their first end-of-text token (50; their largest id, 89, is elsewhere);
    with eos_token_id 2, what configs had before transformers 4.31, at their largest id (98, with 2 before it)."""
    reference = clip_reference(tmp_path / "clip", eos_token_id)
    model, _ = checkpoint_load.load(tmp_path / "clip", device="cpu")
    assert isinstance(model, CLIP)
    assert model.config.text_pooling == ("argmax" if eos_token_id == 2 else "eos")
    ids, mask = texts(eos_token_id if eos_token_id != 2 else 98)
    if eos_token_id == 2:
        ids[:, 1] = 2
    else:
        ids[:, 0] = 89
        assert (ids.argmax(dim=-1) != model.text_end(ids)).all()
    with torch.no_grad():
        close(model.get_image_features(pixels()), reference.get_image_features(pixels()).pooler_output)
        close(model.get_text_features(ids, mask), reference.get_text_features(ids, mask).pooler_output)
        close(model.get_text_features(ids), reference.get_text_features(ids).pooler_output)
        theirs, ours = reference(input_ids=ids, pixel_values=pixels(), attention_mask=mask), model(pixels(), ids, mask)
    close(ours.logits_per_image, theirs.logits_per_image)
    close(ours.logits_per_text, theirs.logits_per_text)
    close(ours.text_embeds, theirs.text_embeds)
    close(ours.image_embeds, theirs.image_embeds)
    assert ours.logits_per_image.shape == (2, 3)


def test_saved_vit_and_clip_load_in_transformers_with_equal_outputs(tmp_path):
    vit_reference(tmp_path / "vit", pooler=True)
    clip_reference(tmp_path / "clip")
    ids, mask = texts(98)
    for name, cls in (("vit", transformers.ViTModel), ("clip", transformers.CLIPModel)):
        model, _ = checkpoint_load.load(tmp_path / name, device="cpu")
        checkpoint_load.save(tmp_path / f"{name}-ours", model, None)
        assert json.loads((tmp_path / f"{name}-ours" / "config.json").read_text())["model_type"] == name
        again = cls.from_pretrained(tmp_path / f"{name}-ours").eval()
        with torch.no_grad():
            if name == "vit":
                theirs, ours = again(pixels()), model(pixels())
                close(ours.last_hidden_state, theirs.last_hidden_state)
                close(ours.pooler_output, theirs.pooler_output)
            else:
                theirs, ours = again(input_ids=ids, pixel_values=pixels(), attention_mask=mask), model(pixels(), ids,
                                                                                                        mask)
                close(ours.logits_per_image, theirs.logits_per_image)


def picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth gradient with noise: resampling filters differ on it wherever they differ at all."""
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    array = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L"))
    return image.convert(mode)


@pytest.mark.parametrize(("size", "mode"), [((50, 37), "RGB"), ((37, 61), "RGBA"), ((20, 20), "L")])
def test_preprocessing_equals_transformers_image_processors(tmp_path, size, mode):
    image = picture(*size, mode)
    vit_processor = transformers.ViTImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, do_convert_rgb=True)
    clip_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                                        crop_size={"height": IMAGE - 4, "width": IMAGE - 4})
    vit_reference(tmp_path / "vit", pooler=False)
    clip_reference(tmp_path / "clip")
    vit_processor.save_pretrained(tmp_path / "vit")
    clip_processor.save_pretrained(tmp_path / "clip")
    for name, processor in (("vit", vit_processor), ("clip", clip_processor)):
        settings = vision.read_preprocessing(tmp_path / name)
        theirs = torch.as_tensor(np.asarray(processor(image, return_tensors="np")["pixel_values"]))
        ours = preprocess_images([image], settings)
        assert ours.dtype == torch.float32
        close(ours, theirs)
    image.save(tmp_path / "picture.png")  # a file reads as the image it holds
    torch.testing.assert_close(preprocess_images([tmp_path / "picture.png"], settings), ours, atol=0, rtol=0)
    assert vision.read_preprocessing(tmp_path / "clip").crop == (IMAGE - 4, IMAGE - 4)
    for ours, processor in ((VIT_PREPROCESSING, transformers.ViTImageProcessorPil()),
                            (CLIP_PREPROCESSING, transformers.CLIPImageProcessorPil())):
        assert ImagePreprocessing.from_hf(processor.to_dict(), "defaults", ours) == ours  # transformers' defaults


def test_bad_inputs_are_one_line_errors_naming_them(tmp_path):
    vit_reference(tmp_path / "vit", pooler=False)
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    (tmp_path / "vit" / "config.json").write_text(json.dumps({**config, "layerscale_value": 0.1}))
    with pytest.raises(SparkGPTError, match=r"unsupported config field\(s\) layerscale_value") as error:
        checkpoint_load.load(tmp_path / "vit", device="cpu")
    assert "\n" not in str(error.value)
    (tmp_path / "vit" / "config.json").write_text(json.dumps({**config, "image_size": [32, 48]}))
    with pytest.raises(SparkGPTError, match=r"'image_size' is \[32, 48\]"):
        checkpoint_load.load(tmp_path / "vit", device="cpu")
    settings = ImagePreprocessing(size=(IMAGE, IMAGE))
    with pytest.raises(SparkGPTError, match="image mode 'F' is not supported") as error:
        preprocess_image(Image.new("F", (8, 8)), settings)
    assert "\n" not in str(error.value)
    with pytest.raises(SparkGPTError, match="not a readable image"):
        (tmp_path / "broken.png").write_bytes(b"not a png")
        preprocess_image(tmp_path / "broken.png", settings)
    (tmp_path / "vit" / "config.json").write_text(json.dumps(config))
    model, _ = checkpoint_load.load(tmp_path / "vit", device="cpu")
    with pytest.raises(SparkGPTError, match=r"expected pixel values \[batch, 3, 32, 32\], got \[1, 3, 16, 16\]"):
        model(torch.zeros(1, 3, 16, 16))
    swiglu = ViT(vision_config(d_model=32, n_layers=1, n_heads=4, image_size=16, patch_size=8, ffn="swiglu"))
    assert swiglu(torch.zeros(1, 3, 16, 16)).last_hidden_state.shape == (1, 5, 32)
    with pytest.raises(SparkGPTError, match="differ from ViT's and CLIP's"):
        checkpoint_load.save(tmp_path / "swiglu", swiglu, None)
    assert not (tmp_path / "swiglu").exists()
    clip_reference(tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    config["text_config"]["position_embedding_type"] = "relative_key"
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SparkGPTError, match=r"\(text_config\): unsupported config field\(s\) position_embedding_type"):
        checkpoint_load.load(tmp_path / "clip", device="cpu")
    del config["text_config"]["position_embedding_type"]
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    clip, _ = checkpoint_load.load(tmp_path / "clip", device="cpu")
    with pytest.raises(SparkGPTError, match=r"text row\(s\) \[1\] have no end-of-text token \(id 98\)"):
        clip.get_text_features(torch.tensor([[5, 98], [5, 6]]))
