"""Preference tuning (DPO): loss equal to TRL's DPOTrainer on the same pairs and weights, with a frozen reference and
with LoRA's base as the reference; what the completion mask covers; truncation; one-line errors for bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparkgpt
import tests.test_finetune as finetune_tests
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import lora
from sparkgpt.train.preference import (
    PreferenceData,
    dpo_batch_loss,
    dpo_loss,
    encode_preference,
    fit_pair,
    frozen_reference,
    reference_logps,
    sequence_logps,
)
from tests.conftest import save_hf_model
from tests.test_finetune import write_jsonl

PAIRS = [
    {"prompt": [{"role": "user", "content": "What colour is the sky?"}],
     "chosen": [{"role": "assistant", "content": "Blue, on a clear day."}],
     "rejected": [{"role": "assistant", "content": "Green."}]},
    {"prompt": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Peru?"}],
     "chosen": [{"role": "assistant", "content": "Lima."}],
     "rejected": [{"role": "assistant", "content": "Cusco, I believe, though I am not sure."}]},
    {"prompt": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
                {"role": "user", "content": "Another?"}],
     "chosen": [{"role": "assistant", "content": "Eleven."}],
     "rejected": [{"role": "assistant", "content": "Nine."}]},
    {"prompt": [{"role": "user", "content": "Say hello politely."}],
     "chosen": [{"role": "assistant", "content": "Hello, nice to meet you."}],
     "rejected": [{"role": "assistant", "content": "What."}]},
]


chat_tokenizer = finetune_tests.chat_tokenizer  # a byte-level BPE with ChatML's special tokens and template


def tiny_llama(tokenizer, seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def policy_and_reference(chat_tokenizer, tmp_path_factory):
    """Two tiny random Llamas saved with the ChatML tokenizer: the policy, and a different reference (with equal
    weights every DPO loss would be log 2, whatever the code computes)."""
    return [save_hf_model(tiny_llama(chat_tokenizer, seed), chat_tokenizer, tmp_path_factory.mktemp(name))
            for seed, name in ((0, "policy"), (1, "reference"))]


def trl_trainer(policy, tokenizer_dir: Path, out: Path, beta: float, ref_model=None, peft_config=None):
    """TRL's DPOTrainer over PAIRS, on the CPU, in fp32."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    args = trl.DPOConfig(output_dir=str(out), report_to="none", use_cpu=True, bf16=False, beta=beta,
                         per_device_train_batch_size=len(PAIRS), dataset_num_proc=None)
    return trl.DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                          processing_class=transformers.AutoTokenizer.from_pretrained(tokenizer_dir),
                          peft_config=peft_config)


def trl_loss(trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """TRL's loss on all of PAIRS as one batch, and the batch its collator made."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item(), batch


def ours(directory: Path, tmp_path: Path, **load) -> tuple[sparkgpt.LM, PreferenceData]:
    lm = sparkgpt.load(directory, device="cpu", **load)
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    return lm, PreferenceData(path, path, lm.tokenizer, block_size=128)


def assert_same_batch(data: PreferenceData, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our batch of PAIRS holds TRL's tokens and completion mask (padding aside); returns it."""
    input_ids, mask = data.batch(data.train, range(len(PAIRS)))
    real = batch["attention_mask"].bool()
    assert input_ids.shape == batch["input_ids"].shape
    assert torch.equal(input_ids[real], batch["input_ids"][real])
    assert torch.equal(mask, batch["completion_mask"].bool())
    return input_ids, mask


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl_with_a_frozen_reference(policy_and_reference, tmp_path, beta):
    transformers = pytest.importorskip("transformers")
    policy_dir, reference_dir = policy_and_reference
    expected, batch = trl_loss(trl_trainer(
        transformers.AutoModelForCausalLM.from_pretrained(policy_dir), policy_dir, tmp_path / "trl", beta,
        ref_model=transformers.AutoModelForCausalLM.from_pretrained(reference_dir)))
    lm, data = ours(policy_dir, tmp_path)
    input_ids, mask = assert_same_batch(data, batch)
    reference = sparkgpt.load(reference_dir, device="cpu").model
    with torch.no_grad():
        loss, chosen, rejected = dpo_batch_loss(lm.model, reference, input_ids, mask, beta=beta)
    assert abs(loss.item() - expected) < 1e-5
    assert abs(expected - 0.6931) > 1e-2  # policy and reference differ, so the loss is not log 2
    assert chosen.shape == rejected.shape == (len(PAIRS),)


def test_dpo_loss_equals_trl_with_lora_and_the_base_as_reference(policy_and_reference, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    policy_dir, _ = policy_and_reference
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    trainer = trl_trainer(transformers.AutoModelForCausalLM.from_pretrained(policy_dir), policy_dir,
                          tmp_path / "trl", beta=0.1, peft_config=config)
    torch.manual_seed(2)  # stand in for training: B starts at zero, where the adapted model is its base
    for name, param in trainer.model.named_parameters():
        if ".lora_" in name:
            param.data.normal_(0, 0.2)
    expected, batch = trl_loss(trainer)
    trainer.model.save_pretrained(tmp_path / "adapter")
    lm, data = ours(policy_dir, tmp_path, adapter=tmp_path / "adapter", merge=False)
    input_ids, mask = assert_same_batch(data, batch)
    assert frozen_reference(lm.model) is None  # LoRA: the reference is the base under the adapters
    with torch.no_grad():
        loss, _, _ = dpo_batch_loss(lm.model, None, input_ids, mask)
        base = sparkgpt.load(policy_dir, device="cpu").model
        assert torch.allclose(reference_logps(lm.model, None, input_ids, mask), sequence_logps(base, input_ids, mask))
    assert abs(loss.item() - expected) < 1e-5
    assert abs(expected - 0.6931) > 1e-3


def test_a_full_reference_is_a_frozen_copy_and_adapters_come_back_on(policy_and_reference):
    policy_dir, _ = policy_and_reference
    model = sparkgpt.load(policy_dir, device="cpu").model
    reference = frozen_reference(model)
    assert reference is not model and not any(p.requires_grad for p in reference.parameters())
    lora.apply_lora(model, lora.LoRAConfig(rank=2, dropout=0.0))
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data.normal_(0, 0.2)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        adapted = model(ids)
        with lora.adapters_disabled(model):
            assert torch.equal(model(ids), reference(ids))
        assert torch.equal(model(ids), adapted)


def reply_text(tokenizer, tokens: tuple[list[int], list[bool]]) -> str:
    ids, mask = tokens
    first = mask.index(True)
    assert all(mask[first:]) and not any(mask[:first])  # one run, to the end
    return tokenizer.decode(ids[first:], skip_special_tokens=False)


def test_completion_mask_covers_only_the_reply(chat_tokenizer, tokenizer):
    pair = encode_preference(chat_tokenizer, PAIRS[2], "x")  # its prompt quotes an earlier assistant turn
    assert reply_text(chat_tokenizer, pair.chosen) == "Eleven.<|im_end|>\n"
    assert reply_text(chat_tokenizer, pair.rejected) == "Nine.<|im_end|>\n"
    ids, mask = pair.chosen
    assert chat_tokenizer.decode(ids[:mask.index(True)], skip_special_tokens=False).endswith(
        "Another?<|im_end|>\n<|im_start|>assistant\n")
    # A string prompt is a user turn under a chat template; plain text, ended by end-of-text, without one.
    record = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
    chat = encode_preference(chat_tokenizer, record, "x")
    assert chat_tokenizer.decode(chat.chosen[0], skip_special_tokens=False) == \
        "<|im_start|>user\nQ: 2+2?\nA:<|im_end|>\n<|im_start|>assistant\n 4<|im_end|>\n"
    plain = encode_preference(tokenizer, record, "x")
    assert reply_text(tokenizer, plain.rejected) == " 5<|endoftext|>"
    assert plain.chosen[0][:plain.chosen[1].index(True)] == tokenizer.encode("Q: 2+2?\nA:")


def test_truncation_keeps_the_prompts_tail_alike_in_both_sequences(tokenizer):
    record = {"prompt": "word " * 40 + "end of prompt", "chosen": " yes", "rejected": " no, not at all"}
    pair = encode_preference(tokenizer, record, "x")
    fitted, truncated = fit_pair(pair, block_size=16)
    assert truncated and max(len(fitted.chosen[0]), len(fitted.rejected[0])) == 16
    for (_, mask), (_, full_mask) in zip((fitted.chosen, fitted.rejected), (pair.chosen, pair.rejected), strict=True):
        assert sum(mask) == sum(full_mask)  # the replies are whole
    cut = len(pair.chosen[0]) - len(fitted.chosen[0])
    assert cut == len(pair.rejected[0]) - 16
    assert fitted.chosen[0] == pair.chosen[0][cut:] and fitted.rejected[0] == pair.rejected[0][cut:]
    # A reply longer than the block keeps one prompt token (its context) and loses its own end.
    long = fit_pair(encode_preference(tokenizer, {**record, "chosen": " yes" * 40}, "x"), block_size=16)[0]
    assert len(long.chosen[0]) == 16 and long.chosen[1] == [False] + [True] * 15


BAD = [
    ('{"prompt": "hi", "chosen": "a", "rejected": "b"', "not valid JSON"),
    ({"prompt": "hi", "chosen": "a"}, "missing 'rejected'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "missing 'prompt', 'chosen', 'rejected'"),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty string or"),
    ({"prompt": "hi", "chosen": "a", "rejected": ["b", "c"]}, "'rejected' must be a string or one assistant"),
    ({"prompt": "hi", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "the prompt's last message is the assistant's"),
    ({"prompt": [{"role": "narrator", "content": "hi"}], "chosen": "a", "rejected": "b"}, "role is 'narrator'"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_bad_records_are_one_line_errors_naming_file_and_line(chat_tokenizer, tmp_path, line, message):
    good = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([good, good, line if isinstance(line, str) else json.dumps(line), good]) + "\n")
    with pytest.raises(SparkGPTError) as error:
        PreferenceData(path, path, chat_tokenizer, block_size=64)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_chat_messages_without_a_chat_template_are_refused(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(SparkGPTError, match=rf"^{path}:1: the prompt is a list of chat messages, but this model"):
        PreferenceData(path, path, tokenizer, block_size=64)


def test_a_file_too_small_to_split_asks_for_a_validation_file(chat_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", PAIRS[:1])
    with pytest.raises(SparkGPTError, match=rf"^{path}: .*validation file"):
        PreferenceData(path, None, chat_tokenizer, block_size=64)


def test_split_and_batches_are_deterministic(chat_tokenizer, tmp_path):
    records = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": "Bad."} for i in range(30)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    data, again = (PreferenceData(path, None, chat_tokenizer, block_size=64, seed=3) for _ in range(2))
    assert (len(data.train), len(data.val)) == (27, 3)
    assert "27 examples" in data.summary() and "3 records held out" in data.summary()
    assert (data.step_rows(3, 5, 8) == again.step_rows(3, 5, 8)).all()
    rows = data.step_rows(3, 5, 8)[:4]
    input_ids, mask = data.batch(data.train, rows)
    assert input_ids.shape[0] == mask.shape[0] == 8 and mask.dtype == torch.bool
    for row, index in enumerate(rows):  # chosen rows first, then the rejected ones, each right-padded
        pair = data.train[int(index)]
        for tokens, line in ((pair.chosen, row), (pair.rejected, row + 4)):
            assert input_ids[line, :len(tokens[0])].tolist() == tokens[0]
            assert mask[line].tolist() == tokens[1] + [False] * (mask.shape[1] - len(tokens[1]))


def test_conservative_label_smoothing_stops_pushing_at_one_minus_epsilon():
    beta, epsilon = 0.5, 0.1
    # Δ = β·(log-ratio margin) where σ(Δ) = 1 − ε: cDPO's optimum, where its gradient vanishes.
    margin = torch.tensor([torch.logit(torch.tensor(1 - epsilon)).item() / beta], requires_grad=True)
    zero = torch.zeros(1)
    loss, chosen, rejected = dpo_loss(margin, zero, zero, zero, beta=beta, label_smoothing=epsilon)
    loss.backward()
    assert abs(margin.grad.item()) < 1e-6
    assert torch.allclose(chosen - rejected, torch.logit(torch.tensor([1 - epsilon])))
    plain, _, _ = dpo_loss(margin.detach(), zero, zero, zero, beta=beta)
    assert torch.allclose(plain, -torch.nn.functional.logsigmoid(beta * margin.detach()))


def test_a_few_lora_steps_raise_the_margin_of_the_preferred_replies(policy_and_reference, tmp_path):
    policy_dir, _ = policy_and_reference
    lm, data = ours(policy_dir, tmp_path)
    lora.apply_lora(lm.model, lora.LoRAConfig(rank=4, dropout=0.0))
    lm.model.train()
    input_ids, mask = data.batch(data.train, range(len(PAIRS)))
    optimizer = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss, chosen, rejected = dpo_batch_loss(lm.model, None, input_ids, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - 0.6931) < 1e-4  # B starts at zero: the policy is its reference
    assert losses[-1] < losses[0] - 0.05 and (chosen > rejected).all()


@pytest.mark.parametrize("method", ["dpo", "full"])
def test_finetune_with_dpo_trains_logs_rewards_and_resumes_exactly(policy_and_reference, tmp_path, monkeypatch,
                                                                   method):
    """`sparkgpt finetune --method dpo` (LoRA, the base as reference) and `--task dpo --method full` (a frozen
    copy): the loss starts at log 2, the held-out loss falls as the reward accuracy rises, and a run interrupted after a
    checkpoint resumes to the same weights (the reference is the starting model, not the restored one)."""
    from tests.conftest import interrupted_at_step

    policy_dir, _ = policy_and_reference
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    task = {"task": "dpo"} if method == "full" else {}
    overrides = {"block_size": 64, "batch_size": 2, "max_steps": 6, "epochs": None, "warmup_steps": 0,
                 "eval_every": 3, "save_every": 3, "eval_batches": 2, "lr": 2e-3 if method == "dpo" else 1e-3,
                 "dtype": "float32", "keep_last": 5, "dpo_beta": 0.5, "log_every": 1}
    whole = sparkgpt.finetune(policy_dir, data, tmp_path / "whole", method=method, **task, overrides=overrides,
                              progress=False)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    assert abs(losses[0] - 0.6931) < 1e-3  # the policy starts as its reference
    evals = [row for row in rows if row["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 0.6931  # held-out pairs: the preferred reply gains
    assert evals[-1]["reward_accuracy"] > 0.5 and evals[-1]["reward_margin"] > 0
    with interrupted_at_step(monkeypatch, 4):
        sparkgpt.finetune(policy_dir, data, tmp_path / "split", method=method, **task, overrides=overrides,
                          progress=False)
    resumed = sparkgpt.finetune(policy_dir, data, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 6
    expected, got = sparkgpt.load(whole.checkpoint, device="cpu"), sparkgpt.load(resumed.checkpoint, device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(expected.model(ids), got.model(ids))


# Replies that answer in one short sentence are preferred to ones that ramble about something else first.
QUESTIONS = ["What is the capital of Italy?", "How many legs does a cat have?", "What colour is grass?",
             "What is two plus three?", "Which planet do we live on?", "What do bees make?",
             "What is frozen water called?", "Which animal barks?", "What is the opposite of up?",
             "How many hours are in a day?", "What do cows drink?", "What shape is a ball?",
             "Which season comes after winter?", "What is the first letter of the alphabet?",
             "What do we use to see?", "Which star lights the day?", "What falls from clouds when it rains?",
             "What colour is snow?", "How many wheels does a bicycle have?", "What do fish live in?",
             "Which meal do people eat in the morning?", "What is the largest ocean?"]
ANSWERS = ["Rome.", "Four.", "Green.", "Five.", "Earth.", "Honey.", "Ice.", "A dog.", "Down.", "Twenty-four.",
           "Water.", "Round.", "Spring.", "A.", "Our eyes.", "The Sun.", "Water drops.", "White.", "Two.", "Water.",
           "Breakfast.", "The Pacific."]


@pytest.mark.slow
def test_dpo_on_smollm2_moves_held_out_pairs_toward_the_preferred_reply(smollm2_gguf, tmp_path):
    """`sparkgpt finetune --method dpo` with its defaults: on pairs it never trained on, the reward margin of the
    preferred reply (β · the change of its log-ratio against the rejected one) is positive for most pairs."""
    def pair(question: str, answer: str) -> dict:
        # A short system turn of its own: the template's default one would make every sequence half again as long.
        return {"prompt": [{"role": "system", "content": "Answer."}, {"role": "user", "content": question}],
                "chosen": answer,
                "rejected": f"Well, let me first tell you about my favourite holiday, which was long. {answer}"}

    pairs = [pair(q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    train, val = write_jsonl(tmp_path / "train.jsonl", pairs[:16]), write_jsonl(tmp_path / "val.jsonl", pairs[16:])
    result = sparkgpt.finetune(smollm2_gguf, train, tmp_path / "run", val=val, method="dpo", progress=False)
    evals = [row for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if row["kind"] == "eval"]
    assert result.step >= 50  # `epochs: auto` on 16 pairs
    assert evals[-1]["val_loss"] < 0.6931 and evals[-1]["reward_margin"] > 0
    assert evals[-1]["reward_accuracy"] >= 5 / 6
