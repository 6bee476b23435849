"""GGUF export of the newer families (issue #22): tiny random transformers Mistral, Phi-3, Qwen2, Qwen3 and Gemma 3
models, loaded by sparkgpt and written as GGUF, then read back three ways: by our reader (logits against
transformers), by the `gguf` package's GGUFReader (architecture, keys, tensor names), and by llama.cpp itself
(node-llama-cpp's prebuilt CPU build, installed into tools/llama_cpp by `make test`: greedy tokens against ours)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import sparkgpt
from sparkgpt.checkpoint.gguf import llama_tensor_names, load_gguf_model, read_gguf
from sparkgpt.checkpoint.gguf_export import write_gguf
from sparkgpt.config import preset
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import GPT

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from conftest import save_hf_model  # noqa: E402
from test_gguf import llama_cpp_permute  # noqa: E402

SHARED = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
              initializer_range=0.1)  # wide weights: greedy choices that no rounding flips
# family -> (transformers classes, config, the llama.cpp architecture it is written as)
FAMILIES = {
    # A window as long as the context is no window: llama.cpp's llama runs it.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=256,
                                                           tie_word_embeddings=False), "llama"),
    # Phi-3's fused qkv / gate_up become Llama's separate matrices on loading; written as llama.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_hidden_layers=2, sliding_window=None,
                                                   tie_word_embeddings=False), "llama"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2, rope_theta=1e6, tie_word_embeddings=True),
              "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True),
              "qwen3"),
    # Six layers: five local (window 8, shorter than the prompts) to one global, as llama.cpp's gemma3 fixes.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_hidden_layers=6, head_dim=32,
                                                             query_pre_attn_scalar=32, sliding_window=8), "gemma3"),
}
PROMPTS = ["The quick brown fox jumps over the lazy dog. To be, or not to be",
           "def add(a, b):\n    return a + b  # code, with    runs of spaces"]


def _make_count(model: torch.nn.Module) -> None:
    """transformers starts biases at 0 and norms at their identity: make them count."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5) if "Gemma" in type(model).__name__ else param.uniform_(0.5, 1.5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tokenizer, tmp_path_factory):
    """(family, transformers model, our LM, {dtype: exported path}) for each family."""
    family = request.param
    config_class, model_class, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=tokenizer.vocab_size, **SHARED, **kwargs)
    reference = getattr(transformers, model_class)(config).eval()
    _make_count(reference)
    directory = save_hf_model(reference, tokenizer, tmp_path_factory.mktemp(f"hf-{family}"))
    lm = sparkgpt.load(directory, device="cpu")
    paths = {dtype: write_gguf(lm.model, lm.tokenizer, directory / f"{family}-{dtype}.gguf", dtype,
                                   name=f"tiny {dtype}")
             for dtype in ("f32", "f16")}
    return family, reference, lm, paths


def test_export_reads_back_with_transformers_logits(exported):
    family, reference, _, paths = exported
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        errors = {dtype: (load_gguf_model(path)(ids) - expected).abs().max().item() for dtype, path in paths.items()}
    assert errors["f32"] <= 1e-4, (family, errors)
    assert errors["f16"] <= 1e-2, (family, errors)  # float16 weights: measured 2.7e-3 to 4.7e-3 on logits up to 4


def test_gguf_reader_sees_the_architecture_keys_and_tensors(exported):
    family, reference, lm, paths = exported
    arch = FAMILIES[family][3]
    config = lm.config
    reader = gguf.GGUFReader(paths["f32"])
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.architecture"] == arch
    expected = {"vocab_size": 320, "context_length": 256, "embedding_length": 64, "block_count": config.n_layers,
                "feed_forward_length": 160, "attention.head_count": 4, "attention.head_count_kv": 2,
                "rope.dimension_count": config.head_dim, "rope.freq_base": pytest.approx(config.rope_theta),
                "attention.layer_norm_rms_epsilon": pytest.approx(config.norm_eps)}
    if config.head_dim != 16:
        expected |= {"attention.key_length": 32, "attention.value_length": 32}
    if arch == "gemma3":
        expected["attention.sliding_window"] = 8
    assert {key: value for key, value in fields.items() if key.startswith(f"{arch}.")} == \
        {f"{arch}.{key}": value for key, value in expected.items()}
    tensors = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    assert set(tensors) == set(llama_tensor_names(config).values())
    optional = {"llama": [], "qwen2": ["attn_q.bias", "attn_k.bias", "attn_v.bias"],
                "qwen3": ["attn_q_norm.weight", "attn_k_norm.weight"],
                "gemma3": ["attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight",
                           "post_ffw_norm.weight"]}[arch]
    for name in optional:
        assert f"blk.0.{name}" in tensors, name
    assert ("output.weight" in tensors) == (not config.tie_embeddings)
    # Independent of our tables: the GGUF tensors against transformers' own weights, in llama.cpp's conventions.
    file = read_gguf(paths["f32"])
    layer = reference.model.layers[0]
    if hasattr(layer.self_attn, "q_proj"):
        q = layer.self_attn.q_proj.weight.detach().numpy()
    else:  # Phi-3: q is the first n_heads · head_dim rows of the fused qkv
        q = layer.self_attn.qkv_proj.weight.detach().numpy()[:4 * config.head_dim]
    if arch == "llama":  # ggml's "norm" rope: rows interleaved; the others ("neox") as they are
        q = llama_cpp_permute(q, 4, 4)
    torch.testing.assert_close(file.tensor("blk.0.attn_q.weight"), torch.from_numpy(q), atol=0, rtol=0)
    norm = layer.input_layernorm.weight.detach()
    torch.testing.assert_close(file.tensor("blk.0.attn_norm.weight"), norm + 1 if arch == "gemma3" else norm)


LLAMA_CPP = Path(os.environ.get("SPARKGPT_LLAMA_CPP", Path(__file__).parent.parent / "tools" / "llama_cpp"))
# Greedy token ids from llama.cpp for each prompt, and its own tokenisation of the prompt.
GREEDY_SCRIPT = """
import {getLlama} from %s;
const [modelPath, maxTokens, ...prompts] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const results = [];
for (const prompt of prompts) {
    const context = await model.createContext({contextSize: 256, threads: 2});
    const tokens = model.tokenize(prompt);
    const generated = [];
    for await (const token of context.getSequence().evaluate(tokens, {temperature: 0, yieldEogToken: true})) {
        generated.push(token);
        if (generated.length >= Number(maxTokens)) break;
    }
    results.push({prompt: Array.from(tokens), generated});
    await context.dispose();
}
console.log(JSON.stringify(results));
"""


def our_greedy(model: torch.nn.Module, ids: list[int], steps: int) -> list[int]:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    return tokens[0, len(ids):].tolist()


def test_llama_cpp_runs_the_export_to_our_greedy_tokens(exported, tmp_path):
    family, _, lm, paths = exported
    package = LLAMA_CPP / "node_modules" / "node-llama-cpp"
    if shutil.which("node") is None or not package.is_dir():
        pytest.skip("llama.cpp is not installed: `make test` installs it where node and npm are (.ci/run does)")
    script = tmp_path / "greedy.mjs"
    script.write_text(GREEDY_SCRIPT % json.dumps((package / "dist" / "index.js").as_uri()))
    steps = 8
    result = subprocess.run(["node", str(script), str(paths["f32"]), str(steps), *PROMPTS], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for prompt, theirs in zip(PROMPTS, json.loads(result.stdout), strict=True):
        ids = lm.tokenizer.encode(prompt)
        assert theirs["prompt"] == ids, (family, "tokenisation")
        assert len(ids) > 8  # longer than Gemma's window: its local layers are exercised
        assert theirs["generated"] == our_greedy(lm.model, ids, steps), family


# ---- what llama.cpp cannot hold, refused by name --------------------------------------------------------------

def test_windows_llama_cpp_does_not_have_are_refused(hf_mistral, hf_qwen2, tmp_path):
    for fixture, arch in ((hf_mistral, "llama"), (hf_qwen2, "qwen2")):
        lm = sparkgpt.load(fixture[1], device="cpu")
        with pytest.raises(SparkGPTError, match=rf"^GGUF export \({arch}\): this \w+ model has a sliding window "
                                                rf"\(8\) shorter than its context \(256\), which llama.cpp's {arch} "):
            write_gguf(lm.model, lm.tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_gemma_models_llama_cpp_would_run_differently_are_refused(hf_gemma3, exported, tmp_path):
    lm = sparkgpt.load(hf_gemma3[1], device="cpu")  # query_pre_attn_scalar 24, head_dim 32
    with pytest.raises(SparkGPTError, match=r"gemma3_text model has query_pre_attn_scalar 24, not its head width 32"):
        write_gguf(lm.model, lm.tokenizer, tmp_path / "x.gguf")
    family, _, lm, _ = exported
    if family != "gemma3":
        return
    config = lm.config
    cases = {
        "soft-capped attention scores or logits": dict(final_logit_softcap=30.0),
        "a local rope base of 20000": dict(rope_local_theta=20_000.0),
        "layer pattern lldlld": dict(attention_patterns=["local", "local", "dense"]),
        "gemma2 model has layer pattern lldlld": dict(qk_norm=False, rope_local_theta=None, attn_logit_softcap=50.0,
                                                      final_logit_softcap=30.0,
                                                      attention_patterns=["local", "local", "dense"]),
        r"rope scaling \(linear\)": dict(rope_scaling={"rope_type": "linear", "factor": 8.0}),
    }
    for message, change in cases.items():
        with pytest.raises(SparkGPTError, match=message):
            write_gguf(GPT(dataclasses.replace(config, **change)), lm.tokenizer, tmp_path / "x.gguf")
    with pytest.raises(SparkGPTError, match=r"supports Llama-family models .*; this model is a mixture of experts"):
        write_gguf(GPT(preset("tiny-moe")), lm.tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_a_phi3_name_llama_cpp_would_fail_on_is_refused(exported, tmp_path):
    """llama.cpp's vocabulary loader special-cases a general.name with "phi3" in it and fails on a vocabulary
    without Phi-3's </s>, <unk> and <s> (measured: "error loading model vocabulary: _Map_base::at")."""
    family, _, lm, _ = exported
    if family != "phi3":
        return
    with pytest.raises(SparkGPTError, match=r"treats a model named 'Phi3-mini' as Phi-3 and looks up </s>, <unk>, "
                                            r"<s> in its vocabulary"):
        write_gguf(lm.model, lm.tokenizer, tmp_path / "Phi3-mini.gguf")
    assert not list(tmp_path.iterdir())
