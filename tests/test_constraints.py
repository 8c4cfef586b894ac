"""Canvas constraints in the engine: fixed positions (infill templates) and initial canvases (predictions)."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.constraints import CanvasConstraints
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tiny_random import EOS_TOKEN_IDS
from tests.helpers import run_to_end
from tests.test_batching import varied_requests

EOS = EOS_TOKEN_IDS[0]
PAD = 0


@pytest.fixture(scope="module")
def batch_engine(tiny_path):
    return LLMEngine(EngineConfig(compile=False, model=str(tiny_path), max_num_seqs=8, prefill_chunk=128))


def params(max_tokens: int, seed: int, **kw) -> SamplingParams:
    base = dict(
        max_tokens=max_tokens,
        denoising_steps=6,
        entropy_bound=2.0,
        t_min=0.3,
        t_max=1.0,
        seed=seed,
        eos_token_ids=list(EOS_TOKEN_IDS),
        include_drafts=True,
    )
    return SamplingParams(**{**base, **kw})


# A template over three canvases of tiny-random (canvas 32): fixed text, holes, a hole across a canvas boundary.
SEGMENTS = [[40, 41, 42], 5, [50] * 20, 12, [60, 61], 30, [70, 71, 72, 73]]
LENGTH = sum(s if isinstance(s, int) else len(s) for s in SEGMENTS)  # 76


def template() -> CanvasConstraints:
    return CanvasConstraints.template(SEGMENTS, EOS, {PAD, EOS})


def fixed_of_template() -> dict[int, int]:
    return {p: t for p, t in template().fixed.items() if p < LENGTH}


def test_fixed_tokens_hold_in_every_pass_and_in_the_answer(batch_engine):
    result = run_to_end(batch_engine, [([5, 6, 7, 8], params(LENGTH, 3), template())])[0]
    fixed = template().fixed
    L = batch_engine.canvas_length
    assert result["passes"], "no passes"
    for event in result["passes"]:
        lo = event.canvas_index * L
        for i, token in enumerate(event.argmax_ids):
            if lo + i in fixed:
                assert token == fixed[lo + i], (event.canvas_index, event.pass_index, i)
    # The answer is the template with its holes filled (fillers dropped): fixed runs appear in order.
    answer = result["answer_ids"]
    assert result["finish"].finish_reason == "stop"
    assert result["finish"].canvases == 3  # 76 positions over canvases of 32
    holes = template().holes
    raw = [t for e in result["commits"] for t in e.token_ids]
    assert raw == answer
    # Rebuild the answer from the committed canvases' argmax ids: fixed tokens at their positions, holes filled.
    last = {e.canvas_index: e for e in result["passes"]}
    canvases = [t for c in sorted(last) for t in last[c].argmax_ids][:LENGTH]
    expected = [t for p, t in enumerate(canvases) if not (p in holes and t in (PAD, EOS))]
    assert answer == expected
    assert [t for p, t in enumerate(canvases) if p not in holes] == list(fixed_of_template().values())
    assert result["finish"].template_logprob is not None and result["finish"].template_logprob <= 0
    assert result["finish"].completion_tokens == len(answer)


def test_fixed_positions_are_marked_in_drafts(batch_engine, tokenizer):
    segments = [tokenizer.encode(" the first", add_special_tokens=False), 6,
                tokenizer.encode(" and the last", add_special_tokens=False)]  # fmt: skip
    c = CanvasConstraints.template(segments, EOS, {PAD, EOS})
    result = run_to_end(batch_engine, [([9, 10, 11], params(30, 4), c)])[0]
    for event in result["passes"]:
        spans = event.fixed_spans
        assert spans and event.draft_text[spans[0][0] : spans[0][1]] == " the first"
        assert event.draft_text[spans[-1][0] : spans[-1][1]] == " and the last"
    text = tokenizer.decode(result["answer_ids"])
    assert text.startswith(" the first") and text.endswith(" and the last")


def test_mixed_batches_stay_batch_invariant(batch_engine):
    others = varied_requests(5, seed=7)
    constrained = [
        ([5, 6, 7, 8], params(LENGTH, 3), template()),
        ([20] * 50, params(40, 11), CanvasConstraints.template([[90, 91], 10, [92]], EOS, {PAD, EOS})),
        ([30, 31], params(64, 12), CanvasConstraints.prediction(list(range(100, 140)), EOS)),
    ]
    alone = [run_to_end(batch_engine, [r])[0] for r in constrained + others]
    together = run_to_end(batch_engine, constrained + others)
    for a, b in zip(alone, together, strict=True):
        assert a["answer_ids"] == b["answer_ids"]
        assert a["finish"].passes == b["finish"].passes
        assert a["finish"].template_logprob == b["finish"].template_logprob
    # The unconstrained rows are exactly what they are with no constrained row in the batch.
    plain = run_to_end(batch_engine, others)
    for a, b in zip(plain, together[len(constrained) :], strict=True):
        assert a["answer_ids"] == b["answer_ids"]


def test_a_prediction_starts_the_canvases_and_is_accounted(batch_engine):
    prediction = list(range(100, 170))  # 70 tokens over three canvases of 32
    c = CanvasConstraints.prediction(prediction, EOS)
    result = run_to_end(batch_engine, [([1, 2, 3], params(96, 5, denoising_steps=1), c)])[0]
    first = [e for e in result["passes"] if e.pass_index == 0]
    finish = result["finish"]
    answer = result["answer_ids"]
    accepted = sum(1 for p, t in enumerate(answer) if p < len(prediction) and prediction[p] == t)
    assert finish.accepted_prediction_tokens == accepted
    assert finish.rejected_prediction_tokens == len(prediction) - accepted
    assert first  # one pass per canvas, each started from the prediction instead of noise
    # Without a prediction the same seed starts from noise and answers differently.
    plain = run_to_end(batch_engine, [([1, 2, 3], params(96, 5, denoising_steps=1))])[0]
    assert plain["answer_ids"] != answer
    assert plain["finish"].accepted_prediction_tokens is None


def test_a_template_cut_by_max_tokens_says_length(batch_engine):
    result = run_to_end(batch_engine, [([5, 6], params(20, 3), template())])[0]
    assert result["finish"].finish_reason == "length"
    assert len(result["answer_ids"]) == 20
    assert result["answer_ids"][:3] == [40, 41, 42]


def test_answer_positions_drop_fillers_in_holes_only():
    c = CanvasConstraints.template([[7, PAD], 3, [8]], EOS, {PAD, EOS})  # positions 0-1 fixed, 2-4 hole, 5 fixed
    canvas = [7, PAD, 9, PAD, EOS, 8, EOS, 3]
    keep, ends = c.answer_positions(0, canvas)
    assert [canvas[p] for p in keep] == [7, PAD, 9, 8]  # a fixed PAD stays; the hole's PAD and EOS go
    assert ends
    keep, ends = c.answer_positions(0, canvas[:4])  # a canvas of 4: the template goes on
    assert keep == [0, 1, 2] and not ends
    assert c.fixed[6] == EOS  # EOS pinned right after the template


def test_fixed_tokens_outside_the_vocabulary_are_refused(batch_engine):
    from engine.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError):
        batch_engine.make_request([1, 2], params(8, 1), constraints=CanvasConstraints.template([[10**6]], EOS, set()))
