"""Generation: parity with transformers' generate and logits processors, batching, streaming, stopping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sparkgpt
from sparkgpt import generate as generation
from sparkgpt.generate import SamplingParams, process_logits
from sparkgpt.model import EncoderDecoder

transformers = pytest.importorskip("transformers")

PROMPTS = ["To be, or not", "def add(a, b):\n    return", "你好，世界", "The quick brown fox jumps over the lazy"]


def test_greedy_generation_equals_transformers_generate(hf_reference):
    reference, directory = hf_reference
    lm = sparkgpt.load(directory, device="cpu")
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        completion = lm.complete([prompt], max_new_tokens=20, temperature=0)[0]
        assert completion.token_ids == expected[0, len(ids):].tolist()
        assert completion.finish_reason == "length"


def test_ragged_batch_equals_each_prompt_alone(hf_reference):
    _, directory = hf_reference
    lm = sparkgpt.load(directory, device="cpu")
    batched = lm.complete(PROMPTS, max_new_tokens=15, temperature=0)
    for prompt, together in zip(PROMPTS, batched, strict=True):
        alone = lm.complete([prompt], max_new_tokens=15, temperature=0)[0]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text


def test_batch_of_prompts_returns_a_list(hf_llama):
    lm = sparkgpt.load(hf_llama[1], device="cpu")
    texts = lm.generate(PROMPTS[:2], max_new_tokens=5, temperature=0)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts[0] == lm.generate(PROMPTS[0], max_new_tokens=5, temperature=0)


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=0.9, top_p=0.8),
    dict(temperature=1.0, top_k=50, top_p=0.5, repetition_penalty=1.3),
    dict(temperature=0, repetition_penalty=1.5),
])
def test_logits_processing_equals_transformers_processors(sampling):
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    logits = torch.randn(3, 400) * 3
    context = torch.randint(0, 400, (3, 12))
    params = SamplingParams(**sampling)
    chain = [lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)]
    if params.temperature > 0:
        chain.append(lp.TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            chain.append(lp.TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            chain.append(lp.TopPLogitsWarper(params.top_p))
    expected = logits.clone()
    for processor in chain:
        expected = processor(context, expected)
    seen = torch.zeros(3, 400, dtype=torch.bool).scatter_(1, context, True)
    actual = process_logits(logits, params, seen)
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], atol=1e-5, rtol=0)


def test_same_seed_same_text_and_other_seed_other_text(hf_gpt2):
    lm = sparkgpt.load(hf_gpt2[1], device="cpu")
    runs = [lm.generate("To be", max_new_tokens=30, temperature=1.0, seed=seed) for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.9, top_p=0.8),
    dict(temperature=1.2, top_k=40, top_p=0.95, repetition_penalty=1.3),
])
def test_seeded_sample_is_the_same_alone_and_in_a_ragged_batch(hf_gpt2, sampling):
    """Every prompt of a batch draws from a generator of its own seeded with the seed: its text does not depend on
    its neighbours (here of other lengths, so it is left-padded among them)."""
    lm = sparkgpt.load(hf_gpt2[1], device="cpu")
    sampling = dict(sampling, max_new_tokens=24, seed=5)
    prompts = [PROMPTS[3], PROMPTS[0], "x"]
    alone = [lm.complete([prompt], **sampling)[0].token_ids for prompt in prompts]
    assert [c.token_ids for c in lm.complete(prompts, **sampling)] == alone
    assert lm.complete([prompts[1]], **dict(sampling, seed=6))[0].token_ids != alone[1]


def test_encoder_decoder_seeded_sample_is_the_same_alone_and_in_a_batch(tokenizer):
    torch.manual_seed(0)
    model = EncoderDecoder(sparkgpt.preset("tiny-seq2seq", vocab_size=tokenizer.vocab_size)).eval()
    lm = sparkgpt.LM(model, tokenizer)
    sampling = dict(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=11)
    sources = ["a b c d e f g", "hello", "the quick brown fox jumps"]
    alone = [lm.complete([source], **sampling)[0].token_ids for source in sources]
    assert [c.token_ids for c in lm.complete(sources, **sampling)] == alone
    assert lm.complete([sources[0]], **sampling)[0].token_ids == alone[0]  # and again
    assert lm.complete([sources[0]], **dict(sampling, seed=12))[0].token_ids != alone[0]


def test_sampler_rows_with_different_parameters_each_draw_as_alone():
    """One call over rows of mixed temperature, top-k, top-p and repetition penalty (grouped and filtered together
    where they agree) picks for each row what a sampler of that row alone picks."""
    torch.manual_seed(0)
    vocab, steps = 300, 6
    rows = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.8, top_p=0.9),
            SamplingParams(temperature=1.3, top_k=7), SamplingParams(temperature=0),
            SamplingParams(temperature=1.0, repetition_penalty=1.5), SamplingParams(temperature=0.8, top_p=0.9)]
    seeds = [1, 2, 3, None, 5, 1]
    contexts = [torch.randint(0, vocab, (5,)).tolist() for _ in rows]
    logits = [torch.randn(len(rows), vocab) * 3 for _ in range(steps)]
    for step in logits:
        step[5] = step[0]  # rows 0 and 5: the same logits and the same seed, so the same tokens
    together = generation.Sampler(len(rows), vocab)
    for row, (params, seed, context) in enumerate(zip(rows, seeds, contexts, strict=True)):
        together.start(row, params, seed, context)
    picks = torch.stack([together.sample(step) for step in logits], dim=1)
    for row, (params, seed, context) in enumerate(zip(rows, seeds, contexts, strict=True)):
        alone = generation.Sampler(1, vocab)
        alone.start(0, params, seed, context)
        assert [int(alone.sample(step[row:row + 1])[0]) for step in logits] == picks[row].tolist()
    assert picks[0].tolist() == picks[5].tolist()
    # Drawn in proportion to the filtered probabilities: a row's frequencies match its distribution.
    sampler = generation.Sampler(1, vocab)
    sampler.start(0, SamplingParams(temperature=1.0, top_k=4), seed=0)
    row_logits = logits[0][:1]
    counts = torch.bincount(torch.cat([sampler.sample(row_logits) for _ in range(4000)]), minlength=vocab)
    expected = process_logits(row_logits, SamplingParams(temperature=1.0, top_k=4), None).softmax(-1)[0]
    assert set(counts.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    torch.testing.assert_close(counts / 4000, expected, atol=0.03, rtol=0)


def test_greedy_tokens_are_argmax_and_fail_only_rows_without_a_finite_maximum():
    """The greedy pick (the sampler's at temperature 0, and a draft's check) is torch.argmax's token, the first of
    equal maxima included; a row fails where it has no finite maximum (NaN, +inf, every token -inf), not where some
    other token is -inf (a masked token: plain decoding goes on there, so a draft's check must too)."""
    torch.manual_seed(0)
    logits = torch.randn(12, 5000).round(decimals=1)  # rounded: many rows hold their maximum twice
    logits[3, 7] = logits[3, 4000] = logits[3].max() + 1
    logits[4, 10] = -torch.inf
    assert (generation.greedy_tokens(logits) == logits.argmax(dim=-1)).all()
    logits[5, 9], logits[6, 11], logits[7] = torch.nan, torch.inf, -torch.inf
    picks = generation.greedy_tokens(logits).tolist()
    assert [row for row, token in enumerate(picks) if token == generation.FAILED] == [5, 6, 7]
    assert picks[3] == 7 and picks[4] == int(logits[4].argmax())


def test_streaming_concatenated_equals_generated_text(hf_reference):
    _, directory = hf_reference
    lm = sparkgpt.load(directory, device="cpu")
    for prompt in ["🙂🚀 你好，世界。", *PROMPTS]:
        for sampling in (dict(temperature=0), dict(temperature=1.0, seed=3)):
            whole = lm.generate(prompt, max_new_tokens=40, **sampling)
            assert "".join(lm.stream(prompt, max_new_tokens=40, **sampling)) == whole


REFERENCE_TEXT = "Emoji 🙂🚀👩‍💻 and Chinese 机器学习和语言模型。 café 🇫🇷!"


def replay(token_ids: list[int]):
    """Stand-in for the decode loop that 'generates' exactly these tokens, to pin down the text layer."""
    def steps(model, prompts, params, images=None):
        for token in token_ids[: params.max_new_tokens]:
            yield torch.tensor([token])
    return steps


def test_stream_never_splits_a_character(monkeypatch, tokenizer):
    token_ids = tokenizer.encode(REFERENCE_TEXT)
    pieces = [tokenizer.decode([t]) for t in token_ids]
    assert any("\ufffd" in piece for piece in pieces), "the test text must have characters split across tokens"
    monkeypatch.setattr(generation, "token_steps", replay(token_ids))
    lm = sparkgpt.LM(sparkgpt.GPT(sparkgpt.preset("tiny-gpt2", vocab_size=tokenizer.vocab_size)), tokenizer)
    deltas = list(lm.stream("x", max_new_tokens=len(token_ids)))
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == REFERENCE_TEXT


@pytest.mark.parametrize("stop", [["学习"], ["🚀"], ["Chinese 机", "🙂"], ["not in the text"]])
def test_stop_strings_end_generation_in_stream_and_batch_alike(monkeypatch, tokenizer, stop):
    token_ids = tokenizer.encode(REFERENCE_TEXT)
    monkeypatch.setattr(generation, "token_steps", replay(token_ids))
    lm = sparkgpt.LM(sparkgpt.GPT(sparkgpt.preset("tiny-gpt2", vocab_size=tokenizer.vocab_size)), tokenizer)
    expected = REFERENCE_TEXT[: min([REFERENCE_TEXT.find(s) for s in stop if s in REFERENCE_TEXT],
                                    default=len(REFERENCE_TEXT))]
    completion = lm.complete(["x"], max_new_tokens=len(token_ids), stop=stop)[0]
    assert completion.text == expected
    assert completion.finish_reason == ("stop" if expected != REFERENCE_TEXT else "length")
    assert "".join(lm.stream("x", max_new_tokens=len(token_ids), stop=stop)) == expected


def test_stop_token_ends_generation_without_appearing(monkeypatch, tokenizer):
    token_ids = [*tokenizer.encode("Hello there"), tokenizer.eos_token_id, *tokenizer.encode(" never")]
    monkeypatch.setattr(generation, "token_steps", replay(token_ids))
    lm = sparkgpt.LM(sparkgpt.GPT(sparkgpt.preset("tiny-gpt2", vocab_size=tokenizer.vocab_size)), tokenizer)
    completion = lm.complete(["x"], max_new_tokens=len(token_ids))[0]
    assert (completion.text, completion.finish_reason) == ("Hello there", "stop")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_incremental_decoding_equals_whole_decoding(tokenizer, text):
    assume(tokenizer.eos_token not in text)  # a special token in the text is dropped from decoded output
    ids = tokenizer.encode(text)
    decoder = tokenizer.incremental_decoder()
    deltas = [decoder.push(token) for token in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.5), dict(top_k=0),
    dict(max_new_tokens=0), dict(stop=[""]), dict(repetition_penalty=0),
])
def test_bad_sampling_parameters_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(sparkgpt.SparkGPTError, match=field):
        SamplingParams(**bad)


def test_prompt_beyond_the_context_is_refused(hf_gpt2):
    lm = sparkgpt.load(hf_gpt2[1], device="cpu")
    with pytest.raises(sparkgpt.SparkGPTError, match="exceeds the model's context of 256"):
        lm.generate("To be " * 100, max_new_tokens=200)
