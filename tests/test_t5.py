"""T5, T5 v1.1 / Flan-T5 and mT5 into our encoder–decoder: tiny random models that transformers saves, which sparkgpt
loads with fp32 logits within 1e-4 (padded sources, relative position buckets past the exact and the logarithmic
range), decodes greedily to transformers' tokens from the decoder start token, and saves back for transformers to
read with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparkgpt
from sparkgpt.errors import SparkGPTError
from sparkgpt.generate import SamplingParams, token_steps
from sparkgpt.model import EncoderDecoder

transformers = pytest.importorskip("transformers")

VOCAB = 96


def t5_checkpoint(directory: Path, model_class: str = "T5ForConditionalGeneration", tied: bool = True, start: int = 0,
                  **settings) -> torch.nn.Module:
    """A tiny random T5 saved with save_pretrained: 8 buckets of distance up to 12, so 20 source and 14 target tokens
    reach every kind of bucket; norms away from 1 so that each is seen; an untied head apart from the embeddings."""
    torch.manual_seed(0)
    config_class = transformers.MT5Config if model_class.startswith("MT5") else transformers.T5Config
    config = config_class(vocab_size=VOCAB, d_model=32, d_kv=12, d_ff=48, num_layers=2, num_decoder_layers=3,
                          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                          tie_word_embeddings=tied, decoder_start_token_id=start, **settings)
    reference = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.uniform_(0.5, 1.5)
        if not tied:  # transformers 5 ties every head at construction; a separate matrix is what untied means
            reference.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
    reference.save_pretrained(directory)
    return reference


def sources() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sources, the second right-padded (pad 0) to the first's 20 tokens, and their attention mask."""
    ids = torch.randint(2, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, 13:], mask[1, 13:] = 0, 0
    return ids, mask


def logits(model, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, EncoderDecoder):
            return model(ids, targets, mask)
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=targets).logits


VARIANTS = {
    "t5-v1.0-relu-tied": dict(feed_forward_proj="relu", tied=True),
    "t5-v1.1-gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tied=False),
    "mt5-gated-gelu-start-token-3": dict(model_class="MT5ForConditionalGeneration", feed_forward_proj="gated-gelu",
                                         tied=False, start=3),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_t5_loads_with_equal_logits_greedy_tokens_and_saves_back(variant, tmp_path):
    settings = VARIANTS[variant]
    start = settings.get("start", 0)
    reference = t5_checkpoint(tmp_path / "theirs", **settings)
    lm = sparkgpt.load(tmp_path / "theirs", device="cpu")
    model, config = lm.model, lm.config
    assert (config.positions, config.ffn, config.decoder_start_token_id) == \
        ("relative", {"relu": "relu", "gated-gelu": "geglu"}[settings["feed_forward_proj"]], start)
    assert config.tie_embeddings == config.scale_decoder_output == settings["tied"]
    assert model.num_parameters() == config.num_parameters() == reference.num_parameters()
    ids, mask = sources()
    targets = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(2))
    expected = logits(reference, ids, mask, targets)
    torch.testing.assert_close(logits(model, ids, mask, targets), expected, atol=1e-4, rtol=0)

    reference.generation_config.eos_token_id = None  # ten tokens each, whatever is sampled
    # Without its cache: transformers 5 sizes that by the encoder's layers, fewer than this decoder's.
    generated = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=1,
                                   use_cache=False)
    assert generated[:, 0].tolist() == [start, start]
    rows = [source[keep.bool()].tolist() for source, keep in zip(ids, mask, strict=True)]  # without the padding
    ours = torch.stack(list(token_steps(model, rows, SamplingParams(max_new_tokens=10, temperature=0.0))), dim=1)
    assert ours.tolist() == generated[:, 1:].tolist()

    lm.save(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (saved["model_type"], saved["feed_forward_proj"], saved["decoder_start_token_id"]) == \
        ("t5", settings["feed_forward_proj"], start)
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == "T5ForConditionalGeneration"
    torch.testing.assert_close(logits(again, ids, mask, targets), expected, atol=1e-4, rtol=0)
    assert again.generation_config.decoder_start_token_id == start


def test_tied_head_rescale_and_no_attention_scaling_matter_at_this_size(tmp_path):
    """The parity above would not notice a missing d_model^-0.5 before the tied head or a 1/√d_k on the scores if
    either changed the logits by less than 1e-4: each, left out, moves them well past that."""
    t5_checkpoint(tmp_path / "theirs")
    model = sparkgpt.load(tmp_path / "theirs", device="cpu").model
    ids, mask = sources()
    targets = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(2))
    expected = logits(model, ids, mask, targets)
    for change in (dict(scale_decoder_output=False), dict(attention_scale=None)):
        changed = EncoderDecoder.from_state_dict(model.config.replace(**change), model.state_dict())
        assert (logits(changed, ids, mask, targets) - expected).abs().max() > 0.05, change


@pytest.mark.parametrize(("field", "value"), [("feed_forward_proj", "gated-relu"), ("is_decoder", True)])
def test_unsupported_t5_setting_is_a_one_line_error_naming_the_field_and_the_file(field, value, tmp_path):
    t5_checkpoint(tmp_path / "theirs")
    path = tmp_path / "theirs" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(SparkGPTError) as error:
        sparkgpt.load(tmp_path / "theirs", device="cpu")
    message = str(error.value)
    assert "\n" not in message and field in message and str(path) in message and repr(value) in message


@pytest.mark.parametrize(("changes", "field"), [(dict(architecture="decoder"), "positions"),
                                                (dict(relative_buckets=2), "relative_buckets")])
def test_relative_positions_outside_an_encoder_decoder_or_with_too_few_buckets_are_refused(changes, field):
    with pytest.raises(SparkGPTError, match=f"config field '{field}'"):
        sparkgpt.ModelConfig(**{"architecture": "encoder-decoder", "positions": "relative", **changes})
