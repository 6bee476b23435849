"""Encoder–decoder: torch.nn.Transformer as the reference (post-norm and pre-norm), beam search against greedy,
and a tiny model trained with the same trainer on a synthetic task, generated from with `sparkgpt generate`."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

import sparkgpt
from sparkgpt.cli import main
from sparkgpt.generate import SamplingParams, beam_search, token_steps
from sparkgpt.model import GPT, EncoderDecoder


def copy_into_reference(ours: EncoderDecoder, reference: nn.Transformer) -> None:
    def attention(theirs: nn.MultiheadAttention, mine) -> None:
        theirs.in_proj_weight.copy_(torch.cat([mine.q_proj.weight, mine.k_proj.weight, mine.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([mine.q_proj.bias, mine.k_proj.bias, mine.v_proj.bias]))
        theirs.out_proj.load_state_dict(mine.o_proj.state_dict())

    def ffn(layer, block) -> None:
        layer.linear1.load_state_dict(block.ffn.up_proj.state_dict())
        layer.linear2.load_state_dict(block.ffn.down_proj.state_dict())

    with torch.no_grad():
        for layer, block in zip(reference.encoder.layers, ours.encoder_blocks, strict=True):
            attention(layer.self_attn, block.attn)
            ffn(layer, block)
            layer.norm1.load_state_dict(block.attn_norm.state_dict())
            layer.norm2.load_state_dict(block.ffn_norm.state_dict())
        for layer, block in zip(reference.decoder.layers, ours.blocks, strict=True):
            attention(layer.self_attn, block.attn)
            attention(layer.multihead_attn, block.cross_attn)
            ffn(layer, block)
            for norm, mine in zip((layer.norm1, layer.norm2, layer.norm3),
                                  (block.attn_norm, block.cross_norm, block.ffn_norm), strict=True):
                norm.load_state_dict(mine.state_dict())
        reference.encoder.norm.load_state_dict(ours.encoder_norm.state_dict())
        reference.decoder.norm.load_state_dict(ours.final_norm.state_dict())


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's nested-tensor notices from its own fast path
@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_encoder_decoder_and_full_outputs_equal_torch_nn_transformer(norm_position):
    torch.manual_seed(0)
    config = sparkgpt.preset("tiny-seq2seq", norm_position=norm_position, n_encoder_layers=3)
    ours = EncoderDecoder(config).eval()
    reference = nn.Transformer(d_model=64, nhead=4, num_encoder_layers=3, num_decoder_layers=2, dim_feedforward=128,
                               dropout=0.0, batch_first=True, norm_first=norm_position == "pre").eval()
    copy_into_reference(ours, reference)
    source, target = torch.randn(2, 11, 64), torch.randn(2, 7, 64)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, 8:] = True  # True: padding (torch's convention); ours is True for real tokens
    ours_mask = (~padding)[:, None, None, :]
    with torch.no_grad():
        memory = reference.encoder(source, src_key_padding_mask=padding)
        ours_memory = ours.encoder_stack(source, ours_mask)
        torch.testing.assert_close(ours_memory[0], memory[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_memory[1, :8], memory[1, :8], atol=1e-5, rtol=0)
        decoded = reference.decoder(target, memory, tgt_mask=causal, tgt_is_causal=True,
                                    memory_key_padding_mask=padding)
        torch.testing.assert_close(ours.decoder_stack(target, ours.memory_kv(memory), ours_mask), decoded,
                                   atol=1e-5, rtol=0)
        full = reference(source, target, tgt_mask=causal, tgt_is_causal=True)
        ours_full = ours.decoder_stack(target, ours.memory_kv(ours.encoder_stack(source)), None)
        torch.testing.assert_close(ours_full, full, atol=1e-5, rtol=0)


def test_cached_decoding_equals_teacher_forcing():
    torch.manual_seed(0)
    model = EncoderDecoder(sparkgpt.preset("tiny-seq2seq")).eval()
    source, target = torch.randint(3, 64, (2, 9)), torch.randint(3, 64, (2, 8))
    source_mask = torch.ones_like(source)
    source_mask[0, 6:] = 0
    with torch.no_grad():
        full = model(source, target, source_mask)
        from sparkgpt.model import KVCache

        cache = KVCache(model.config, 2, 8, torch.float32, torch.device("cpu"))
        kv = model.memory_kv(model.encode(source, source_mask))
        steps = [model.decode(target[:, t:t + 1], kv, source_mask, cache) for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_beam_search_with_one_beam_is_greedy(kind):
    torch.manual_seed(0)
    if kind == "decoder":
        model = GPT(sparkgpt.preset("tiny-sparse")).eval()
    else:
        model = EncoderDecoder(sparkgpt.preset("tiny-seq2seq")).eval()
    prompt = torch.randint(3, 64, (6,)).tolist()
    greedy = SamplingParams(max_new_tokens=20, temperature=0)
    expected = [int(t) for t in token_steps(model, [prompt], greedy)]
    stop = {expected[7]}  # a stop token greedy meets half way: both must end there
    ids, stopped = beam_search(model, prompt, SamplingParams(max_new_tokens=20, num_beams=1), stop)
    assert stopped and ids == expected[:expected.index(expected[7])]
    ids, stopped = beam_search(model, prompt, SamplingParams(max_new_tokens=20, num_beams=1), set())
    assert not stopped and ids == expected


def test_beam_search_wide_enough_finds_the_most_likely_continuation():
    """Against exhaustive search: with vocab^(L-1) beams nothing is pruned, so beam search must find the argmax of
    Σ log p over every continuation of L tokens (fixed length: the length penalty cannot matter)."""
    torch.manual_seed(1)
    model = GPT(sparkgpt.preset("tiny-llama", vocab_size=8)).eval()
    with torch.no_grad():  # sharper distributions than the near-uniform random init
        model.lm_head.weight.mul_(40)
    prompt, length = [1, 2, 3], 3
    candidates = torch.cartesian_prod(*[torch.arange(8)] * length)
    ids = torch.cat([torch.tensor(prompt).expand(len(candidates), -1), candidates], dim=1)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids)[:, len(prompt) - 1:-1], dim=-1)
    totals = logprobs.gather(2, candidates[..., None]).squeeze(-1).sum(dim=1)
    best = candidates[totals.argmax()].tolist()
    ids, _ = beam_search(model, prompt, SamplingParams(max_new_tokens=length, num_beams=8 ** (length - 1)), set())
    assert ids == best


def reverse_task(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
        pairs.append({"source": digits, "target": digits[::-1]})
    return pairs


@pytest.mark.slow
def test_trained_with_the_trainer_reverses_digit_strings(tmp_path):
    """`sparkgpt train --config seq2seq-small --data pairs.jsonl`, then greedy generation: ≥ 95% exact match."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in reverse_task(3000, seed=0)), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy machine
    try:
        assert main(["train", "--config", "seq2seq-small", "--data", str(data), "--out", str(tmp_path / "run"),
                     "--max_steps", "400", "--warmup_steps", "30", "--lr", "3e-3", "--eval_every", "400",
                     "--save_every", "400", "--model.n_layers", "2", "--model.n_encoder_layers", "2",
                     "--model.d_model", "64", "--model.d_ff", "256", "--quiet"]) == 0
        lm = sparkgpt.load(tmp_path / "run", device="cpu")
        held_out = reverse_task(200, seed=1)
        outputs = lm.generate([pair["source"] for pair in held_out], max_new_tokens=12, temperature=0)
        accuracy = sum(out == pair["target"] for out, pair in zip(outputs, held_out, strict=True)) / len(held_out)
        assert accuracy >= 0.95, accuracy
        beam = lm.generate([pair["source"] for pair in held_out[:20]], max_new_tokens=12, num_beams=4)
        assert sum(out == pair["target"] for out, pair in zip(beam, held_out, strict=False)) >= 19
    finally:
        torch.set_num_threads(threads)
    assert main(["generate", str(tmp_path / "run"), "--prompt", "12345", "--temperature", "0",
                 "--max-new-tokens", "12", "--device", "cpu"]) == 0


def test_one_sources_memory_serves_every_beam_as_its_expanded_copy_would():
    """Cross-attention to a memory of batch 1 from several rows (beams of one source, the rows folded into query
    positions) equals attending to the memory repeated for each row."""
    torch.manual_seed(0)
    model = EncoderDecoder(sparkgpt.preset("tiny-seq2seq")).eval()
    attention = model.blocks[0].cross_attn
    memory = torch.randn(1, 7, model.config.d_model)
    queries = torch.randn(3, 2, model.config.d_model)
    padding = torch.tensor([True] * 5 + [False] * 2)[None, None, None, :]  # the source's last two are padding
    for mask in (None, padding):
        shared = attention(queries, attention.project_memory(memory), mask)
        repeated = attention(queries, attention.project_memory(memory.expand(3, -1, -1)),
                             None if mask is None else mask.expand(3, -1, -1, -1))
        torch.testing.assert_close(shared, repeated, atol=1e-6, rtol=0)


def test_reordering_the_cache_moves_each_rows_filled_columns():
    from sparkgpt.model import KVCache

    config = sparkgpt.preset("tiny-seq2seq")
    cache = KVCache(config, 3, 10, torch.float32, torch.device("cpu"))
    for layer in range(config.n_layers):
        cache.update(layer, torch.randn(3, config.n_kv_heads, 4, config.head_dim),
                     torch.randn(3, config.n_kv_heads, 4, config.head_dim))
    cache.advance(4)
    before_keys, before_values = cache.keys[:, :, :, :4].clone(), cache.values[:, :, :, :4].clone()
    rows = torch.tensor([2, 2, 0])
    cache.reorder(rows)
    assert torch.equal(cache.keys[:, :, :, :4], before_keys[:, rows])
    assert torch.equal(cache.values[:, :, :, :4], before_values[:, rows])
    cache.reorder(torch.tensor([1]))  # fewer rows: the cache shrinks to them (row 1 now holds the old row 2)
    assert cache.keys.shape[1] == 1 and torch.equal(cache.keys[:, 0, :, :4], before_keys[:, 2])
