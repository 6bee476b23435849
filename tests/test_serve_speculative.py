"""Speculative decoding by prompt lookup in the serving engine: lossless at temperature 0, fewer forwards."""

from __future__ import annotations

import math
import threading

import pytest
import torch

import sparkgpt
from sparkgpt import SamplingParams, Tokenizer
from sparkgpt.generate import prompt_lookup_draft
from sparkgpt.model.quant import quantize_model
from sparkgpt.serve.engine import Engine
from tests.test_serve import tiny_lm

# A text whose continuation repeats it: what a correction or a summary does, and what prompt lookup guesses.
PASSAGE = "the cat sat on the mat and the dog sat on the log; " * 3


def test_prompt_lookup_drafts_what_followed_the_latest_earlier_occurrence_of_the_last_tokens():
    assert prompt_lookup_draft([1, 2, 3, 4, 5, 9, 2, 3], 4) == [4, 5, 9, 2]
    assert prompt_lookup_draft([7, 8, 1, 7, 8, 2, 7, 8], 1) == [2]       # the latest occurrence, not the first
    assert prompt_lookup_draft([1, 2, 3, 4, 5, 9, 3], 3) == [4, 5, 9]    # no 3- or 2-gram recurs: the last token
    assert prompt_lookup_draft([3, 4, 1, 3, 5, 9, 3], 3) == []           # ... only where it occurred just once before
    assert prompt_lookup_draft([3, 4, 1, 3, 5, 1, 3], 2) == [5, 1]       # a recurring pair is anchor enough
    assert prompt_lookup_draft([1, 2, 3], 3) == [] and prompt_lookup_draft([7], 3) == []
    assert prompt_lookup_draft([1, 2, 1, 2], 0) == []


def plain_and_speculative(lm: sparkgpt.LM, **options) -> tuple[Engine, Engine]:
    return (Engine(lm, speculative_tokens=0, prefix_cache_bytes=0, **options).start(),
            Engine(lm, prefix_cache_bytes=0, **options).start())


@pytest.mark.parametrize("kind", ["float32", "int4", "sinusoidal"])
def test_greedy_text_with_drafts_equals_plain_decoding_in_fewer_steps(tokenizer: Tokenizer, kind: str):
    lm = tiny_lm(tokenizer, max_seq_len=256, positions="sinusoidal" if kind == "sinusoidal" else "rope")
    if kind == "int4":  # the native decode step, its rows mapped to slots
        lm = sparkgpt.LM(quantize_model(lm.model, "int4"), lm.tokenizer)
    plain, speculative = plain_and_speculative(lm, max_slots=2, context=256)
    try:
        if kind == "int4":
            assert speculative.step.native is not None
        if kind == "sinusoidal":  # no lean step: the model's own forward, a draft's rows gathered from its slot
            assert speculative.step is None
        prompt = lm.encode(PASSAGE)
        for params in [SamplingParams(max_new_tokens=40, temperature=0),
                       SamplingParams(max_new_tokens=7, temperature=0),  # drafts never run past max_tokens
                       SamplingParams(max_new_tokens=40, top_k=1, temperature=0.9)]:  # top_k 1 is greedy too
            expected = plain.generate(prompt, params)[0]
            got = speculative.generate(prompt, params)[0]
            assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids,
                                                                    expected.finish_reason)
            assert len(got.token_ids) == params.max_new_tokens
        assert speculative.accepted_tokens > 0
        assert speculative.steps < plain.steps
        # A stop string inside an accepted run of draft tokens ends the text where plain decoding ends it.
        text = plain.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0))[0].text
        stop = text[len(text) // 2:len(text) // 2 + 3]
        params = SamplingParams(max_new_tokens=40, temperature=0, stop=[stop])
        expected = plain.generate(prompt, params)[0]
        got = speculative.generate(prompt, params)[0]
        assert (got.text, got.finish_reason) == (expected.text, "stop") and expected.finish_reason == "stop"
    finally:
        plain.stop()
        speculative.stop()


def test_a_ruled_out_token_in_a_drafts_scores_is_no_numerical_failure(tokenizer: Tokenizer, monkeypatch):
    """A score of -inf (a token ruled out, as a logit bias or a grammar rules one out) in the rows checking a draft
    is no failure: plain decoding goes on past it, so the drafted text does too, to the same last token."""
    step_rows = Engine._step_rows

    def ruled_out(self: Engine, *args, **kwargs) -> torch.Tensor:
        logits = step_rows(self, *args, **kwargs).clone()
        logits[:, 5] = -math.inf
        return logits

    monkeypatch.setattr(Engine, "_step_rows", ruled_out)
    lm = tiny_lm(tokenizer, max_seq_len=256)
    plain, speculative = plain_and_speculative(lm, max_slots=1, context=256)
    try:
        prompt, params = lm.encode(PASSAGE), SamplingParams(max_new_tokens=40, temperature=0)
        expected = plain.generate(prompt, params)[0]
        got = speculative.generate(prompt, params)[0]
        assert (got.text, got.finish_reason) == (expected.text, "length") and expected.finish_reason == "length"
        assert speculative.accepted_tokens > 0
    finally:
        plain.stop()
        speculative.stop()


def test_sampled_requests_decoded_beside_drafted_ones_draw_what_they_draw_without_them(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=256)
    plain, speculative = plain_and_speculative(lm, max_slots=4, context=256)
    prompt = lm.encode(PASSAGE)
    requests = [SamplingParams(max_new_tokens=30, temperature=0), SamplingParams(max_new_tokens=30, seed=3),
                SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=1.3),  # not drafted: penalised
                SamplingParams(max_new_tokens=30, temperature=0)]
    try:
        expected = [plain.generate(prompt, params)[0].text for params in requests]
        results: list[str | None] = [None] * len(requests)

        def run(index: int) -> None:
            results[index] = speculative.generate(prompt, requests[index], timeout=60)[0].text

        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert results == expected
        assert speculative.accepted_tokens > 0
    finally:
        plain.stop()
        speculative.stop()


def test_logprobs_and_grammars_are_decoded_one_token_at_a_time(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=256)
    engine = Engine(lm, max_slots=2, context=256).start()
    try:
        events = []
        engine.submit(lm.encode(PASSAGE), SamplingParams(max_new_tokens=12, temperature=0), events.append,
                      logprobs=0)
        deadline = threading.Event()
        while not any(event.finish_reason for batch in events for event in batch):
            deadline.wait(0.05)
        assert sum(len(event.logprobs) for batch in events for event in batch) == 12
        assert engine.drafted_tokens == 0
    finally:
        engine.stop()


def test_a_draft_never_writes_past_the_slots_context(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=256)
    prompt = lm.encode(PASSAGE)
    context = len(prompt) + 20
    plain, speculative = plain_and_speculative(lm, max_slots=1, context=context)
    try:
        params = SamplingParams(max_new_tokens=context - len(prompt), temperature=0)
        assert speculative.generate(prompt, params)[0].text == plain.generate(prompt, params)[0].text
        assert torch.isfinite(speculative.cache.keys).all()
    finally:
        plain.stop()
        speculative.stop()
