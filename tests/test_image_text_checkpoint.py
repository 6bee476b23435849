"""transformers' VisionEncoderDecoderModel (a ViT encoder, a GPT-2 decoder) checkpoints, read into our ImageText and
written back, checked against transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparkgpt.checkpoint import load as checkpoint_load
from sparkgpt.checkpoint import vision
from sparkgpt.config import ImageTextConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.model.vision import ImageText

transformers = pytest.importorskip("transformers")

IMAGE, PATCH, WIDTH, HEADS, LAYERS, FFN, VOCAB, POSITIONS = 32, 8, 64, 4, 2, 128, 100, 32
START, PAD, EOS = 1, 0, 2


def _theirs(tie: bool = True) -> transformers.VisionEncoderDecoderModel:
    torch.manual_seed(0)
    encoder = transformers.ViTModel(transformers.ViTConfig(
        hidden_act="gelu_new", layer_norm_eps=1e-5, image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH,
        num_attention_heads=HEADS, num_hidden_layers=LAYERS, intermediate_size=FFN))
    decoder = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        add_cross_attention=True, is_decoder=True, n_embd=WIDTH, n_head=HEADS, n_layer=LAYERS, n_inner=FFN,
        vocab_size=VOCAB, n_positions=POSITIONS, bos_token_id=EOS, eos_token_id=EOS, tie_word_embeddings=tie))
    model = transformers.VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id, model.config.pad_token_id = START, PAD
    # transformers initialises LayerNorms to 1 and 0 and biases to 0; random ones catch a norm or bias mapped wrong.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "layernorm" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


def _ours() -> ImageText:
    torch.manual_seed(1)
    # Weights ten times GPT-2's 0.02, so that the greedy tokens depend on the image and the step.
    config = ImageTextConfig.from_dict(dict(
        architecture="encoder-decoder", positions="learned", norm="layernorm", ffn="gelu", bias=True,
        norm_position="pre", final_norm=True, tie_embeddings=True, scale_embeddings=False, vocab_size=VOCAB,
        n_layers=LAYERS, n_encoder_layers=LAYERS, n_heads=HEADS, d_model=WIDTH, d_ff=FFN, max_seq_len=POSITIONS,
        image_size=IMAGE, patch_size=PATCH, num_channels=3, decoder_start_token_id=START, pad_token_id=PAD,
        eos_token_id=EOS, initializer_range=0.2))
    model = ImageText(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=generator)
    return pixels, torch.randint(0, VOCAB, (2, 7), generator=generator)


def _their_logits(model: transformers.VisionEncoderDecoderModel, pixels: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels, decoder_input_ids=ids).logits


def _our_logits(model: ImageText, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels, ids)


def _our_greedy(model: ImageText, pixels: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes: the reference the checkpoint must reproduce in transformers."""
    ids = torch.full((len(pixels), 1), START)
    for _ in range(steps):
        ids = torch.cat([ids, _our_logits(model, pixels, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_checkpoint_loads_with_equal_logits_and_saves_back_for_transformers(
        tmp_path: Path, tie: bool) -> None:
    theirs = _theirs(tie)
    theirs.save_pretrained(tmp_path / "theirs")
    assert vision.checkpoint_kind(tmp_path / "theirs") == "vision-encoder-decoder"
    model, tokenizer = checkpoint_load.load(tmp_path / "theirs", device="cpu")
    assert isinstance(model, ImageText) and tokenizer is None
    assert model.config.tie_embeddings is tie
    assert (model.config.decoder_start_token_id, model.config.pad_token_id) == (START, PAD)
    pixels, ids = _inputs()
    expected = _their_logits(theirs, pixels, ids)
    torch.testing.assert_close(_our_logits(model, pixels, ids), expected, atol=1e-4, rtol=0)

    checkpoint_load.save(tmp_path / "ours", model, None)
    again = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(_their_logits(again, pixels, ids), expected, atol=1e-4, rtol=0)


def test_our_model_saved_is_read_by_transformers_with_equal_logits_and_greedy_decoding(tmp_path: Path) -> None:
    model = _ours()
    checkpoint_load.save(tmp_path / "ours", model, None)
    theirs = transformers.VisionEncoderDecoderModel.from_pretrained(tmp_path / "ours").eval()
    pixels, ids = _inputs()
    torch.testing.assert_close(_their_logits(theirs, pixels, ids), _our_logits(model, pixels, ids),
                               atol=1e-4, rtol=0)
    with torch.no_grad():
        generated = theirs.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False, num_beams=1,
                                    min_new_tokens=6, decoder_start_token_id=START, pad_token_id=PAD)
    assert generated.tolist() == _our_greedy(model, pixels, 6).tolist()

    loaded, _ = checkpoint_load.load(tmp_path / "ours", device="cpu")
    torch.testing.assert_close(_our_logits(loaded, pixels, ids), _our_logits(model, pixels, ids), atol=0, rtol=0)


def test_preprocessing_is_written_for_transformers_and_read_back(tmp_path: Path) -> None:
    model = _ours()
    checkpoint_load.save(tmp_path / "ours", model, None)
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / "ours")
    assert processor.size == {"height": IMAGE, "width": IMAGE}
    assert checkpoint_load.load(tmp_path / "ours", device="cpu").model.preprocessing == model.preprocessing
    assert vision.read_preprocessing(tmp_path / "ours") == model.preprocessing


def test_preprocessing_of_another_size_than_the_model_is_refused(tmp_path: Path) -> None:
    checkpoint_load.save(tmp_path / "ours", _ours(), None)
    path = tmp_path / "ours" / vision.PREPROCESSOR_FILE
    values = json.loads(path.read_text())
    path.write_text(json.dumps({**values, "size": {"height": 224, "width": 224}}))
    with pytest.raises(SparkGPTError, match=r"preprocessor_config\.json.*'size'"):
        checkpoint_load.load(tmp_path / "ours", device="cpu")


@pytest.mark.parametrize("change, field", [
    (lambda hf: hf["decoder"].update(model_type="bert"), "decoder.model_type"),
    (lambda hf: hf["encoder"].update(model_type="deit"), "encoder.model_type"),
    (lambda hf: hf["encoder"].update(hidden_size=32), "encoder.hidden_size"),
    (lambda hf: hf["encoder"].update(hidden_act="gelu"), "encoder.hidden_act"),
    (lambda hf: hf["decoder"].update(add_cross_attention=False), "add_cross_attention"),
])
def test_checkpoint_our_model_cannot_share_is_refused_naming_config_json(tmp_path: Path, change, field: str) -> None:
    _theirs().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    hf = json.loads(path.read_text())
    change(hf)
    path.write_text(json.dumps(hf))
    with pytest.raises(SparkGPTError, match=rf"config\.json.*{field}") as error:
        checkpoint_load.load(tmp_path, device="cpu")
    assert "\n" not in str(error.value)


def test_projection_between_widths_is_refused_naming_the_weights(tmp_path: Path) -> None:
    _theirs().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["enc_to_dec_proj.weight"] = torch.zeros(WIDTH, WIDTH)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SparkGPTError, match=r"model\.safetensors.*enc_to_dec_proj"):
        checkpoint_load.load(tmp_path, device="cpu")
