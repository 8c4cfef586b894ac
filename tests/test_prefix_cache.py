"""Automatic prefix caching: warm prefixes are bit-identical to cold ones, seeded answers do not change, the
cache is bounded, and its metrics count tokens."""

from __future__ import annotations

import random

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tiny_random import EOS_TOKEN_IDS
from tests.helpers import run_to_end

CHUNK = 128  # the engines' prefill_chunk


def params(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=40, denoising_steps=4, entropy_bound=2.0, t_min=0.3, t_max=1.0, seed=seed,
                          eos_token_ids=list(EOS_TOKEN_IDS), include_drafts=False)  # fmt: skip


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(20, 1000) for _ in range(n)]


@pytest.fixture(scope="module")
def cold_engine(tiny_path):
    return LLMEngine(
        EngineConfig(compile=False, model=str(tiny_path), max_num_seqs=4, prefill_chunk=CHUNK, prefix_cache_tokens=0)
    )


def warm_engine(tiny_path, tokens: int = 4096) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            compile=False, model=str(tiny_path), max_num_seqs=4, prefill_chunk=CHUNK, prefix_cache_tokens=tokens
        )
    )


def counter(engine: LLMEngine, name: str) -> float:
    return engine.metrics.registry.get_sample_value(f"press:{name}_total", {"model_name": str(engine.config.model)})


def test_warm_prefix_is_bit_identical_to_cold(tiny_path):
    engine = warm_engine(tiny_path)
    shared = prompt(300, 1)  # longer than tiny-random's sliding window (64) and than two prefill chunks
    cold = engine.make_request([*shared, 7, 8, 9], params(1))
    engine.runner.start_cache(cold, engine.prefix_cache)
    while cold.cached_len < len(cold.prompt_ids):
        engine.runner.prefill(cold, 128 - cold.cached_len % 128)
    engine.runner.finish_prefill(cold, engine.prefix_cache)
    assert cold.prefix_hit == 0 and engine.prefix_cache.cached_tokens == 288  # nine full blocks of 32
    warm = engine.make_request([*shared, 7, 8, 9], params(1))
    assert engine.runner.start_cache(warm, engine.prefix_cache) == 288
    while warm.cached_len < len(warm.prompt_ids):
        engine.runner.prefill(warm, 128 - warm.cached_len % 128)
    layer_types = engine.runner.layer_types
    assert "sliding_attention" in layer_types and "full_attention" in layer_types
    for idx in range(len(layer_types)):
        a, b = cold.cache.layers[idx], warm.cache.layers[idx]
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), (idx, layer_types[idx])


def test_seeded_answers_are_the_same_warm_or_cold(tiny_path, cold_engine):
    engine = warm_engine(tiny_path)
    system = prompt(200, 2)
    requests = [(system + prompt(n, 10 + n), params(n)) for n in (5, 40, 130)] + [(system, params(3))]
    expected = [run_to_end(cold_engine, [r])[0]["answer_ids"] for r in requests]
    first = [run_to_end(engine, [r])[0]["answer_ids"] for r in requests]  # the first one warms the system prompt
    again = run_to_end(engine, requests)  # all warm, batched together
    assert first == expected
    assert [r["answer_ids"] for r in again] == expected
    queried, hit = counter(engine, "prefix_cache_queries"), counter(engine, "prefix_cache_hits")
    lengths = [len(p) for p, _ in requests]
    assert queried == 2 * sum(lengths)
    # Restores end where a cold prefill's chunks end (multiples of 128 here). First round: request 1 finds
    # nothing; 2-4 find the system prompt's 6 blocks (192 tokens) and restore 128 of them. Second round: every
    # prompt finds all its own full blocks and restores up to its last chunk end among them.
    assert hit == 3 * 128 + sum(n // CHUNK * CHUNK for n in lengths)


def _prefilled_cache(engine: LLMEngine, ids: list[int]):
    """The request's encoder cache after the engine's own prefill (restore, then chunks), and its restored length."""
    state = engine.make_request(ids, params(1))
    engine.add_request(state)
    engine.scheduler.schedule()
    while state.cached_len < len(ids) or state.cache is None:
        engine._prefill(lambda *_: None)
    engine.scheduler.finish(state)
    return state.cache, state.prefix_hit


@pytest.mark.parametrize("n", [33, 65, 100, 130, 200, 300])
def test_a_prompt_met_again_is_encoded_bit_for_bit_as_cold(tiny_path, cold_engine, n):
    """The same prompt twice, whatever its length: the second prefill restores what it can and encodes the rest,
    and every layer's keys and values equal a cold prefill's bit for bit (restoring every cached block and
    encoding a short rest alone gave other bits: GEMMs and attention of another shape)."""
    engine = warm_engine(tiny_path)
    ids = prompt(n, 100 + n)
    cold, _ = _prefilled_cache(cold_engine, ids)
    _prefilled_cache(engine, ids)
    warm, hit = _prefilled_cache(engine, ids)
    assert hit == n // CHUNK * CHUNK
    for a, b in zip(cold.layers, warm.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_without_batch_invariance_every_cached_block_is_restored(tiny_path):
    """The stock kernels' mode promises no bitwise reproducibility (as across batch sizes), so a prompt restores
    every cached block it starts with, as vLLM's prefix caching does."""
    engine = LLMEngine(EngineConfig(compile=False, model=str(tiny_path), prefill_chunk=CHUNK, batch_invariant=False))
    ids = prompt(65, 7)
    _prefilled_cache(engine, ids)
    assert _prefilled_cache(engine, ids)[1] == 64


def test_the_cache_is_bounded_least_recently_used_first(tiny_path):
    engine = warm_engine(tiny_path, tokens=256)  # 8 blocks
    a, b = prompt(160, 3), prompt(160, 4)  # 5 blocks each
    run_to_end(engine, [(a, params(1))])
    run_to_end(engine, [(b, params(1))])
    assert engine.prefix_cache.cached_tokens <= 256
    assert len(engine.prefix_cache.lookup(b)) == 5  # the newest stays whole
    assert len(engine.prefix_cache.lookup(a)) < 5  # the oldest lost blocks first
