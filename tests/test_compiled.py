"""Compiled passes (engine/compiled.py): the batched sampler's math, compiled logits against eager ones, seeded
answers against the eager engine's, and a `--compile` server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import batch_sampler, denoise
from engine.compiled import history_depth
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import run_to_end

BUCKETS = 2  # max_num_seqs of the compiled engine: buckets 1 and 2, so a 2-row pass pads nothing and 1 row pads


# Without a prefix cache: a prompt met again would restore its prefix and encode only the rest, in GEMMs of
# other shapes than the first time (README, Prefix cache), which these tests do not compare.
@pytest.fixture(scope="module")
def compiled(tiny_path):
    return LLMEngine(EngineConfig(model=str(tiny_path), max_num_seqs=BUCKETS, compile=True, prefix_cache_tokens=0))


@pytest.fixture(scope="module")
def eager(tiny_path):
    return LLMEngine(
        EngineConfig(model=str(tiny_path), max_num_seqs=BUCKETS, compile=False, batch_invariant=False,
                     prefix_cache_tokens=0)
    )  # fmt: skip


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(20, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_batch_sampler_is_the_eager_samplers_math():
    """Uncompiled, the batched sampler gives exactly what the row-by-row functions give from the same
    generators: proposals, acceptance, renoised canvases, argmax, stop statistics."""
    rows, canvas, vocab = 3, 40, 300
    logits = torch.randn(rows, canvas, vocab) * 3
    temperature = torch.tensor([0.7, 1.0, 0.45])
    greedy = [False, True, False]
    bounds = torch.tensor([0.1, 1.0, 5.0])
    history = torch.randint(0, vocab, (rows, 2, canvas))
    history[1, 1] = (logits[1] / temperature[1]).argmax(-1)  # row 1 was stable at its last pass
    valid = torch.tensor([[True, True], [False, True], [False, False]])
    thresholds = torch.tensor([10.0, 10.0, 1e-9])
    seeds = [5, 6, 7]

    draws = batch_sampler.Draws.empty(rows, canvas, vocab, torch.device("cpu"))
    batch_sampler.draw(draws, [torch.Generator().manual_seed(s) for s in seeds], greedy, vocab)
    new_canvas, argmax, accepted, new_history, processed, stats = batch_sampler.sample_batch(
        logits, temperature, torch.tensor(greedy), draws.race, draws.noise, bounds, history, valid, thresholds,
        torch.float32,
    )  # fmt: skip
    for i in range(rows):
        g = torch.Generator().manual_seed(seeds[i])
        x = logits[i] / temperature[i]
        proposed = denoise.propose_canvas(x, greedy[i], 1.0, g)
        entropy = denoise.token_entropy(x)
        acc = denoise.accept_mask(entropy, bounds[i].item())
        expected_canvas = denoise.renoise(torch.zeros(canvas, dtype=torch.long), proposed, acc, vocab, g)
        depth = int(valid[i].sum())
        stable = bool(denoise.stable_flag(history[i, 2 - depth :], x.argmax(-1)))
        assert torch.equal(argmax[i], x.argmax(-1))
        assert torch.equal(accepted[i], acc)
        assert torch.equal(new_canvas[i], expected_canvas)
        assert torch.equal(processed[i], x)
        assert torch.equal(new_history[i, -1], x.argmax(-1))
        assert stats[i].tolist() == [
            float(acc.sum()),
            pytest.approx(entropy.mean().item()),
            float(stable),
            float(entropy.mean().item() < thresholds[i].item()),
        ]
    assert stats[1, 2] == 1.0 and stats[0, 2] == 0.0 and stats[2, 2] == 1.0  # no threshold: stable


def _prefilled(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams):
    states = [engine.make_request(p, params.with_changes(seed=i)) for i, p in enumerate(prompts)]
    for s in states:
        engine.add_request(s)
    engine.scheduler.schedule()
    while any(s.canvas is None for s in states):
        engine._prefill(lambda *_: None)
    return states


@pytest.mark.parametrize("lengths", [[37], [37, 150], [300, 5]], ids=["one-row-padded-batch", "two-rows", "long-short"])
def test_compiled_logits_match_eager(compiled, eager, lengths):
    """A compiled pass's logits equal the eager pass's within 1e-4 (fp32), on its first pass (no
    self-conditioning) and its second (with), whatever the rows' prefix lengths and the bucket's padding."""
    params = SamplingParams(max_tokens=32, denoising_steps=8, eos_token_ids=[])
    prompts = [_prompt(n, n) for n in lengths]
    ours, theirs = _prefilled(compiled, prompts, params), _prefilled(eager, prompts, params)
    try:
        for _ in range(2):
            got = compiled.runner.denoise_logits(ours)
            want = eager.runner.denoise_logits(theirs)
            assert got.shape == want.shape == (len(lengths), compiled.canvas_length, compiled.vocab_size)
            assert (got - want).abs().max().item() < 1e-4
            compiled._sample_compiled(ours, got)
            eager._sample_rows(theirs, want)
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a.canvas, b.canvas)  # same proposals and draws: the next pass sees the same canvas
    finally:
        for engine, states in ((compiled, ours), (eager, theirs)):
            for s in states:
                engine.scheduler.finish(s)
            engine.runner.release_prefix()


CASES = [
    ("greedy", dict(seed=2, t_min=0.0, t_max=0.0)),
    ("sampled", dict(seed=3)),
    ("sampled-two-canvases", dict(seed=4, max_tokens=60)),
    ("hot-wide-bound", dict(seed=5, entropy_bound=5.0, t_min=0.9, t_max=1.4)),
    ("stability-2", dict(seed=6, stability_threshold=2, confidence_threshold=10.0)),
    ("stability-3", dict(seed=7, stability_threshold=3, confidence_threshold=10.0)),  # a history depth of 4
]


def test_seeded_answers_match_the_eager_engine(compiled, eager):
    """Every case alone and all together: compiled answers are the eager engine's (the share is reported by
    bench/engine.py; on this model every case is identical)."""
    base = SamplingParams(max_tokens=32, denoising_steps=12, eos_token_ids=[])
    requests = [(_prompt(20 + 9 * i, i), base.with_changes(**kw)) for i, (_, kw) in enumerate(CASES)]
    for req in requests:
        assert run_to_end(compiled, [req])[0]["answer_ids"] == run_to_end(eager, [req])[0]["answer_ids"]
    pairs = [requests[:2], requests[2:4], requests[4:6]]
    for pair in pairs:
        assert [r["answer_ids"] for r in run_to_end(compiled, pair)] == [
            r["answer_ids"] for r in run_to_end(eager, pair)
        ]


def test_sampler_graphs_take_history_depths_in_powers_of_two():
    """Stability thresholds 0..1024 (the API's range) make at most 12 sampler graphs per bucket."""
    depths = {history_depth(t) for t in range(1025)}
    assert sorted(depths) == [0] + [2**k for k in range(11)]
    assert all(history_depth(t) >= t for t in range(1025))


def test_a_second_compiled_engine_computes_with_its_own_current_weights(compiled, tiny_path):
    """Precompiled graphs run without guards, so they must not be shared across engines nor bake in weights: a
    second compiled engine whose weights then change answers with the new weights (its eager pass's logits), and
    the first engine's logits stay its own."""
    other = LLMEngine(EngineConfig(model=str(tiny_path), max_num_seqs=1, compile=True))
    with torch.no_grad():
        for param in other.runner.model.parameters():
            param.mul_(1.5)
    params = SamplingParams(max_tokens=32, denoising_steps=8, eos_token_ids=[])
    ours, theirs = _prefilled(other, [_prompt(40, 1)], params), _prefilled(compiled, [_prompt(40, 1)], params)
    try:
        got, first = other.runner.denoise_logits(ours), compiled.runner.denoise_logits(theirs)
        graphs, other.runner.compiled = other.runner.compiled, None
        want = other.runner.denoise_logits(ours)  # eager, on the changed weights
        other.runner.compiled = graphs
        assert (got - want).abs().max().item() < 1e-4
        assert (got - first).abs().max().item() > 1e-2
    finally:
        for engine, states in ((other, ours), (compiled, theirs)):
            for s in states:
                engine.scheduler.finish(s)
            engine.runner.release_prefix()


def test_rows_needing_their_own_processing_share_a_compiled_pass(compiled, tiny_path):
    """A top-p row and a grammar-constrained row batched with a plain one: the pass's logits come from the
    compiled graph and the eager sampler handles the batch; the grammar still holds and all finish."""
    base = compiled.defaults.with_changes(max_tokens=32, denoising_steps=12, include_drafts=False)
    results = run_to_end(
        compiled,
        [
            (_prompt(30, 1), base.with_changes(seed=1, top_p=0.8)),
            (_prompt(40, 2), base.with_changes(seed=2), 'start: "yes" | "no"'),
        ],
    )
    assert all(r["finish"].finish_reason in ("stop", "length") for r in results)
    eos = set(base.eos_token_ids)
    text = compiled.tokenizer.decode([t for t in results[1]["answer_ids"] if t not in eos])
    assert text in ("yes", "no")


def test_dense_experts_are_the_routed_experts(compiled, eager):
    """The compiled engine's MoE layers run densely (engine/dense_experts.py: the tiny model has 4 experts,
    top 2); dense, every expert layer gives its routed output (tokens weighted by the experts they picked) within
    fp32 rounding. The 26B model (128 experts, top 8) keeps grouped_mm."""
    from transformers import AutoConfig

    from engine import dense_experts

    modules = [m for m in compiled.runner.model.modules() if getattr(m, "_press_dense", False)]
    assert modules and not any(getattr(m, "_press_dense", False) for m in eager.runner.model.modules())
    g = torch.Generator().manual_seed(0)
    for module in modules:
        hidden = torch.randn(24, module.hidden_dim, generator=g)
        weights, index = torch.rand(24, module.num_experts, generator=g).softmax(-1).topk(2, dim=-1)
        with torch.inference_mode():
            routed = module(hidden, index, weights)  # outside a graph: transformers' own experts
            dense = dense_experts.dense_forward(module, hidden, index, weights)
        assert routed.abs().max() > 0 and (dense - routed).abs().max().item() < 1e-5
    full = AutoConfig.from_pretrained(Path(__file__).parents[1] / "configs" / "models" / "diffusiongemma-26b-a4b-it")
    assert not dense_experts.worthwhile(full.get_text_config())


def test_compile_and_batch_invariance_are_exclusive(tiny_path):
    with pytest.raises(ValueError, match="compile and batch_invariant"):
        LLMEngine(EngineConfig(model=str(tiny_path), compile=True, batch_invariant=True))


def test_compiled_server_is_not_ready_until_compiled_and_answers_like_eager(tiny_path, server):
    """`press serve --compile`: /ready answers 503 (not_ready) while the buckets compile, then a seeded chat
    streams its drafts and gives the eager server's answer, with exact usage."""
    import httpx
    import openai

    from tests.conftest import ServerProcess

    proc = ServerProcess(["--model", str(tiny_path), "--served-model-name", "tiny-random", "--compile",
                          "--max-num-seqs", "1"])  # fmt: skip
    try:
        first = None
        while first is None:
            try:
                first = httpx.get(proc.base_url + "/ready", timeout=1)
            except httpx.HTTPError:
                assert proc.proc.poll() is None, proc.log_path.read_text()[-2000:]
        assert first.status_code == 503 and first.json()["error"]["code"] == "not_ready"
        proc.wait_ready(timeout=300)
        kwargs = dict(model="tiny-random", messages=[{"role": "user", "content": "compile me"}], max_tokens=40, seed=11,
                      extra_body={"denoising_steps": 12})  # fmt: skip
        compiled = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        eager = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        got = compiled.chat.completions.create(**kwargs)
        assert got.choices[0].message.content == eager.chat.completions.create(**kwargs).choices[0].message.content
        assert got.usage.completion_tokens > 0
        chunks = list(compiled.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == got.choices[0].message.content
        assert any(c.choices[0].model_extra.get("draft") for c in chunks if c.choices)
        assert chunks[-1].usage.model_dump() == got.usage.model_dump()
    finally:
        proc.stop()
