"""The serving engine's prefix cache: a radix tree of token blocks that outlives the slots, LRU under a byte budget."""

from __future__ import annotations

import torch

from sparkgpt import SamplingParams, Tokenizer
from sparkgpt.model.quant import DECODE_ROWS
from sparkgpt.serve.engine import Engine
from sparkgpt.serve.prefix_cache import PrefixCache
from tests.test_serve import tiny_lm

LAYERS, HEADS, DIM, COLUMNS = 2, 3, 4, 64


def slot_tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot's keys and values [layers, kv_heads, columns, d], numbered so that a copied column is recognisable."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(LAYERS, HEADS, COLUMNS, DIM, generator=generator),
            torch.randn(LAYERS, HEADS, COLUMNS, DIM, generator=generator))


def block_bytes(tokens: int) -> int:
    return 2 * LAYERS * HEADS * tokens * DIM * 4


def test_longest_prefix_is_found_across_blocks_and_inside_a_partial_block():
    cache = PrefixCache(block_tokens=4, budget_bytes=10**9)
    keys, values = slot_tensors(0)
    tokens = list(range(100, 110))  # two whole blocks and a last one of 2
    cache.insert(tokens, keys, values)
    assert len(cache) == 10 and cache.bytes == block_bytes(10)
    assert cache.longest(tokens)[0] == 10
    assert cache.longest(tokens, limit=9)[0] == 9         # the last prompt token is left to compute
    assert cache.longest([*tokens[:6], 7, 7])[0] == 6     # parts ways inside the second block
    assert cache.longest([*tokens, 1, 2, 3])[0] == 10
    assert cache.longest([5, *tokens])[0] == 0
    # What a path copies is exactly the columns the inserted slot held for those tokens.
    length, path = cache.longest([*tokens[:7], 0, 0])
    into_keys, into_values = torch.zeros_like(keys), torch.zeros_like(values)
    cache.copy_into(path, into_keys, into_values)
    assert length == 7
    assert torch.equal(into_keys[:, :, :7], keys[:, :, :7]) and torch.equal(into_values[:, :, :7], values[:, :, :7])
    assert not into_keys[:, :, 7:].any()


def test_sequences_share_their_common_blocks_and_a_longer_last_block_replaces_a_shorter_one():
    cache = PrefixCache(block_tokens=4, budget_bytes=10**9)
    keys, values = slot_tensors(0)
    cache.insert([1, 2, 3, 4, 5, 6], keys, values)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8, 9], keys, values)  # extends the last block [5, 6] to [5, 6, 7, 8]
    assert len(cache) == 9 and cache.bytes == block_bytes(9)
    cache.insert([1, 2, 3, 4, 5], keys, values)  # already covered by the longer block
    assert len(cache) == 9
    other_keys, other_values = slot_tensors(1)
    cache.insert([1, 2, 3, 4, 9, 9], other_keys, other_values)  # a branch after the shared first block
    assert len(cache) == 11
    length, path = cache.longest([1, 2, 3, 4, 9, 9, 0])
    into_keys, into_values = torch.zeros_like(keys), torch.zeros_like(values)
    cache.copy_into(path, into_keys, into_values)
    assert length == 6
    assert torch.equal(into_keys[:, :, :4], keys[:, :, :4]) and torch.equal(into_keys[:, :, 4:6], other_keys[:, :, 4:6])


def test_least_recently_used_sequences_are_evicted_to_stay_within_the_budget():
    cache = PrefixCache(block_tokens=4, budget_bytes=block_bytes(8))
    keys, values = slot_tensors(0)
    cache.insert([1, 1, 1, 1, 1, 1, 1, 1], keys, values)
    cache.insert([2, 2, 2, 2], keys, values)
    assert cache.bytes == block_bytes(12) - block_bytes(4)  # over budget: the oldest leaf, [1 × 4] second block
    assert cache.longest([1] * 8)[0] == 4 and cache.longest([2] * 4)[0] == 4
    cache.longest([1] * 4)  # used now: [2 × 4] is the oldest
    cache.insert([3, 3, 3, 3], keys, values)
    assert cache.bytes <= cache.budget
    assert cache.longest([1] * 4)[0] == 4 and cache.longest([3] * 4)[0] == 4 and cache.longest([2] * 4)[0] == 0
    nothing = PrefixCache(block_tokens=4, budget_bytes=0)
    nothing.insert([1, 2, 3], keys, values)
    assert nothing.bytes == 0 and nothing.longest([1, 2, 3])[0] == 0


def test_a_conversations_second_turn_prefills_only_its_new_tokens_after_every_slot_was_reused(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=256)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    first = lm.encode("Once upon a time there was a castle by the sea, and in it lived")
    engine = Engine(lm, max_slots=2, context=256, prefix_cache_bytes=2**24).start()
    plain = Engine(lm, max_slots=2, context=256, prefix_cache_bytes=0).start()
    try:
        reply = engine.generate(first, greedy)[0]
        assert len(reply.token_ids) == 12 and reply.text == plain.generate(first, greedy)[0].text
        for topic in ["A dragon", "The history of bicycles", "Why cats purr"]:  # every slot holds something else now
            engine.generate(lm.encode(topic), greedy)
        second = [*first, *reply.token_ids, *lm.encode(" Then the tide came in.")]
        before = engine.reused_prompt_tokens
        answer = engine.generate(second, greedy)[0]
        # Every token of the first turn's prompt and reply was cached, except the reply's last token (sampled, never
        # fed back): that token and the new text are all the second turn computes.
        reused = engine.reused_prompt_tokens - before
        assert reused == len(first) + len(reply.token_ids) - 1
        assert answer.text == plain.generate(second, greedy)[0].text
        assert plain.reused_prompt_tokens == 0
    finally:
        engine.stop()
        plain.stop()


def test_the_prefix_cache_stays_within_its_budget_and_forgets_the_least_recent_conversation(tokenizer: Tokenizer):
    lm = tiny_lm(tokenizer, max_seq_len=128)
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    per_token = 2 * lm.config.n_layers * lm.config.n_kv_heads * (lm.config.d_model // lm.config.n_heads) * 4
    engine = Engine(lm, max_slots=1, context=128, prefix_cache_bytes=60 * per_token).start()
    try:
        old = lm.encode("An old conversation about the weather in the mountains, which nobody continues.")
        recent = lm.encode("A recent conversation about bread, and how long the dough should rise.")
        engine.generate(old, greedy)
        engine.generate(recent, greedy)
        assert engine.prefixes.bytes <= 60 * per_token
        before = engine.reused_prompt_tokens
        engine.generate([*recent, 5], greedy)
        assert engine.reused_prompt_tokens - before == len(recent)
        before = engine.reused_prompt_tokens
        engine.generate([*old, 5], greedy)
        assert engine.reused_prompt_tokens - before < len(old) // 2
    finally:
        engine.stop()


def test_a_short_chunk_after_a_cached_prefix_takes_the_lean_step_and_a_fresh_prompt_the_forward(
        tokenizer: Tokenizer, monkeypatch):
    """Which way a chunk is prefilled depends on its own request alone, so its text never depends on who else
    arrived: a fresh prompt through the forward, as generating it alone does; a chat turn's few new tokens after
    its cached prefix through the lean decode step."""
    stepped: list[list[int]] = []
    original = Engine._prefill_through_step

    def spy(self, rows):
        stepped.append([count for _, count in rows])
        return original(self, rows)

    monkeypatch.setattr(Engine, "_prefill_through_step", spy)
    lm = tiny_lm(tokenizer, max_seq_len=256)
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    first = lm.encode("Once upon a time there was a castle by the sea, and in it lived")
    short = lm.encode("A dragon")
    engine = Engine(lm, max_slots=4, context=256, prefix_cache_bytes=2**24).start()
    try:
        solo = [lm.complete([prompt], max_new_tokens=8, temperature=0)[0].text for prompt in (first, short)]
        assert [engine.generate(prompt, greedy)[0].text for prompt in (first, short)] == solo
        assert stepped == []  # nothing cached: through the forward, as alone
        before = engine.reused_prompt_tokens
        engine.generate([*first, *lm.encode(" Then the tide came in.")], greedy)
        assert engine.reused_prompt_tokens - before >= 16
        assert stepped and all(0 < count <= DECODE_ROWS for counts in stepped for count in counts)
    finally:
        engine.stop()
