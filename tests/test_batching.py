"""Continuous batching in the engine: shared passes, batch invariance, slots, chunked prefill, cancellation."""

from __future__ import annotations

import random
from copy import deepcopy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.events import FinishEvent, PassEvent
from engine.request import DenoiseState, RequestStatus
from engine.sampling_params import SamplingParams
from engine.tiny_random import EOS_TOKEN_IDS
from tests.helpers import run_to_end


@pytest.fixture(scope="module")
def batch_engine(tiny_path):
    return LLMEngine(EngineConfig(compile=False, model=str(tiny_path), max_num_seqs=8, prefill_chunk=128))


def varied_requests(n: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(10, 1000) for _ in range(rng.choice([1, 7, 40, 130, 300]))]
        params = SamplingParams(
            max_tokens=rng.choice([16, 32, 50, 96]),
            denoising_steps=rng.choice([2, 4, 7]),
            entropy_bound=rng.choice([0.1, 5.0, 20.0]),
            t_min=rng.choice([0.1, 0.3]),
            t_max=rng.choice([0.5, 0.8, 1.2]),
            top_p=rng.choice([1.0, 0.9]),
            seed=1000 + i,
            eos_token_ids=list(EOS_TOKEN_IDS),
            stop=rng.choice([[], ["e"], [" the"]]),
            include_drafts=False,
        )
        out.append((prompt, params))
    return out


def test_batch_invariance_alone_or_among_seven_others(batch_engine):
    requests = varied_requests(8)
    alone = [run_to_end(batch_engine, [r])[0] for r in requests]
    together = run_to_end(batch_engine, requests)
    for a, b in zip(alone, together, strict=True):
        assert a["answer_ids"] == b["answer_ids"]
        assert a["finish"].finish_reason == b["finish"].finish_reason
        assert a["finish"].passes == b["finish"].passes


def test_batch_invariance_with_staggered_arrivals(batch_engine):
    requests = varied_requests(6, seed=1)
    alone = [run_to_end(batch_engine, [r])[0]["answer_ids"] for r in requests]
    states, answers = [], {}

    def emit(state, event):
        if isinstance(event, FinishEvent):
            answers[state.request_id] = list(state.answer_ids)

    for i, (prompt, params) in enumerate(requests):
        state = batch_engine.make_request(prompt, params)
        states.append(state)
        batch_engine.add_request(state)
        for _ in range(i + 1):  # others join and leave at different pass boundaries
            batch_engine.step(emit)
    while batch_engine.has_unfinished():
        batch_engine.step(emit)
    assert [answers[s.request_id] for s in states] == alone


def record_batch_sizes(runner, method: str, monkeypatch) -> list[int]:
    """Wrap runner.<method>(rows) so each call's number of rows is recorded in the returned list."""
    sizes: list[int] = []
    original = getattr(runner, method)

    def spy(rows):
        sizes.append(len(rows))
        return original(rows)

    monkeypatch.setattr(runner, method, spy)
    return sizes


def test_one_forward_serves_every_running_row(batch_engine, monkeypatch):
    batch_sizes = record_batch_sizes(batch_engine.runner, "denoise_logits", monkeypatch)
    params = SamplingParams(max_tokens=32, denoising_steps=5, seed=1, include_drafts=False)
    run_to_end(batch_engine, [([10, 11, 12], params)] * 8)
    assert batch_sizes == [8] * 5  # five passes, each one forward over all eight canvases


def test_canvases_finishing_together_are_committed_in_one_encoder_pass(batch_engine, monkeypatch):
    commits = record_batch_sizes(batch_engine.runner, "commit", monkeypatch)
    params = SamplingParams(max_tokens=96, denoising_steps=3, seed=1, eos_token_ids=[], include_drafts=False)
    # Prompts within one prefill chunk (128) start together; their caches cross the sliding window (64).
    requests = [(list(range(10, 10 + n)), params) for n in (3, 40, 9, 20, 50)]
    results = run_to_end(batch_engine, requests)
    assert commits == [5, 5]  # three canvases each: two commits, the last canvas ends the request
    assert all(len(r["answer_ids"]) == 96 for r in results)
    # Each row's later canvases attended to its own committed keys: the answers are the solo ones, token for token.
    assert [r["answer_ids"] for r in results] == [run_to_end(batch_engine, [req])[0]["answer_ids"] for req in requests]


def stock_tolerance(engine: LLMEngine) -> dict:
    """How close stock kernels keep a row batched to the row alone: 1e-4 in fp32; in bf16 (CUDA's default) the
    GEMMs' blocking moves values by a few of its units (up to 0.06 seen on CPU), below what a leaked row gives."""
    tol = 1e-4 if engine.loaded.dtype == torch.float32 else 0.1
    return {"rtol": tol, "atol": tol}


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["stock-kernels", "batch-invariant-kernels"])
def test_batched_commit_writes_each_rows_cache_as_alone(tiny_path, batch_invariant):
    """Rows with different cache lengths (some past the sliding window) commit in one encoder pass; each
    row's cache afterwards equals committing that row alone (bitwise under batch invariance)."""
    engine = LLMEngine(
        EngineConfig(compile=False, model=str(tiny_path), max_num_seqs=4, batch_invariant=batch_invariant)
    )
    params = SamplingParams(max_tokens=64, denoising_steps=4, seed=3, include_drafts=False)
    for n in (3, 40, 130, 9):
        engine.add_request(engine.make_request(list(range(10, 10 + n)), params))
    engine.step(lambda *_: None)  # prefill all four
    rows = list(engine.scheduler.running)
    gen = torch.Generator().manual_seed(0)
    canvases = [torch.randint(10, 1000, (engine.canvas_length,), generator=gen) for _ in rows]
    alone = []
    for state, canvas in zip(rows, canvases, strict=True):
        copy = DenoiseState(prompt_ids=state.prompt_ids, params=params, text=state.text)
        copy.cache, copy.cached_len = deepcopy(state.cache), state.cached_len
        engine.runner.commit([(copy, canvas)])
        alone.append(copy)
    engine.runner.commit(list(zip(rows, canvases, strict=True)))
    for state, single in zip(rows, alone, strict=True):
        assert state.cached_len == single.cached_len
        for together_layer, alone_layer in zip(state.cache.layers, single.cache.layers, strict=True):
            for a, b in ((together_layer.keys, alone_layer.keys), (together_layer.values, alone_layer.values)):
                if batch_invariant:
                    assert torch.equal(a, b)
                else:
                    torch.testing.assert_close(a, b, **stock_tolerance(engine))


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["stock-kernels", "batch-invariant-kernels"])
def test_batched_pass_hides_each_rows_padding(tiny_path, batch_invariant):
    """Rows with different prompt lengths in one pass see exactly their own prefix: their logits match the
    row alone (bitwise under batch invariance, to float tolerance with stock kernels and a padding mask)."""
    engine = LLMEngine(
        EngineConfig(compile=False, model=str(tiny_path), max_num_seqs=4, batch_invariant=batch_invariant)
    )
    params = SamplingParams(max_tokens=32, denoising_steps=4, seed=3, include_drafts=False)
    for n in (3, 40, 130, 9):
        engine.add_request(engine.make_request(list(range(10, 10 + n)), params))
    engine.step(lambda *_: None)  # prefill all four (within one chunk budget) and run a first pass
    rows = list(engine.scheduler.running)
    assert len(rows) == 4 and all(s.status is RequestStatus.DENOISING for s in rows)
    together = engine.runner.denoise_logits(rows)
    for i, state in enumerate(rows):
        alone = engine.runner.denoise_logits([state])[0]
        if batch_invariant:
            assert torch.equal(together[i], alone)
        else:
            torch.testing.assert_close(together[i], alone, **stock_tolerance(engine))


def test_slots_bound_the_batch_and_the_rest_wait(tiny_path):
    engine = LLMEngine(EngineConfig(compile=False, model=str(tiny_path), max_num_seqs=2))
    params = SamplingParams(max_tokens=32, denoising_steps=3, seed=1, include_drafts=False)
    states = [engine.make_request([10, 11], params) for _ in range(3)]
    for s in states:
        engine.add_request(s)
    seen_running = []
    while engine.has_unfinished():
        engine.step(lambda s, e: None)
        seen_running.append(len(engine.scheduler.running))
    assert max(seen_running) == 2
    assert all(s.status is RequestStatus.FINISHED for s in states)
    assert engine.scheduler.running == [] and not engine.scheduler.waiting


def test_cancelled_request_leaves_within_one_pass(tiny_path):
    engine = LLMEngine(EngineConfig(compile=False, model=str(tiny_path)))
    params = SamplingParams(max_tokens=1024, denoising_steps=48, seed=1, include_drafts=False)
    a, b = engine.make_request([10, 11], params), engine.make_request([12], params)
    events: list = []
    for s in (a, b):
        engine.add_request(s)
    for _ in range(3):
        engine.step(lambda s, e: events.append((s.request_id, e)))
    a.cancelled.set()
    engine.step(lambda s, e: events.append((s.request_id, e)))
    assert engine.scheduler.running == [b]
    finishes = [e for rid, e in events if isinstance(e, FinishEvent)]
    assert [f.finish_reason for f in finishes] == ["abort"] and a.cache is None
    passes_of_a = [e for rid, e in events if rid == a.request_id and isinstance(e, PassEvent)]
    assert len(passes_of_a) == 3


def test_long_prompt_is_prefilled_in_chunks_without_stalling(tiny_path):
    engine = LLMEngine(EngineConfig(compile=False, model=str(tiny_path), prefill_chunk=256))
    runner_prefills = []
    original = engine.runner.prefill

    def spy(state, n):
        runner_prefills.append(n)
        return original(state, n)

    engine.runner.prefill = spy
    params = SamplingParams(max_tokens=64, denoising_steps=20, seed=1, include_drafts=False)
    running = engine.make_request([10, 11, 12], params)
    engine.add_request(running)
    engine.step(lambda s, e: None)
    passes = []
    long_prompt = engine.make_request(list(range(10, 10 + 1000)), params)
    engine.add_request(long_prompt)
    for _ in range(4):
        before = running.total_passes
        engine.step(lambda s, e: None)
        passes.append(running.total_passes - before)
    assert runner_prefills == [3, 256, 256, 256, 232]
    assert passes == [1, 1, 1, 1]  # the running canvas advanced every step while the prompt was encoded
    assert long_prompt.status is RequestStatus.DENOISING


class _FullVocabAllocations(TorchDispatchMode):
    """Counts new fp32 tensors (not views or in-place results) with at least `numel` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() < self.numel:
                continue
            if t.untyped_storage().data_ptr() not in storages:
                self.count += 1
        return out


def test_sampling_allocates_no_second_full_vocab_tensor(batch_engine, monkeypatch):
    """The sampler works in place on the row's logits and in position chunks: the only canvas x vocab fp32
    tensor of a row is the one the model returned."""
    from engine import denoise

    monkeypatch.setattr(denoise, "ENTROPY_CHUNK", 8)  # the tiny canvas is 32: make chunks smaller than it
    engine = batch_engine
    params = SamplingParams(max_tokens=32, denoising_steps=4, seed=1, top_p=0.9, include_drafts=False)
    states = [engine.make_request([10 + i, 11], params) for i in range(4)]
    for s in states:
        engine.runner.prefill(s, 100)
        engine._start_canvas(s)
    logits = engine.runner.denoise_logits(states)
    spy = _FullVocabAllocations(engine.canvas_length * engine.vocab_size)
    with spy:
        for i, s in enumerate(states):
            engine._sample_row(s, logits[i])
    assert spy.count == 0
