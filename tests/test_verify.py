"""The verification pass (engine/verify.py): it scores finished canvases and changes no token."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.helpers import run_to_end

PROMPTS = [[2, 10, 11, 12, 13], [2, 40, 41], [2, 7, 8, 9, 10, 11, 12, 13, 14]]


def params(seed: int, **changes) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 24, "denoising_steps": 4, "seed": seed, "eos_token_ids": [1], **changes})


def test_the_score_is_the_models_log_probability_of_the_finished_canvas(engine):
    """One canvas: the mean, over the answer's tokens (EOS aside), of their log-probabilities in one forward of the
    model over the prompt and the finished canvas, computed here with transformers' own forward."""
    for prompt, seed in zip(PROMPTS, (3, 4, 5), strict=True):
        out = run_to_end(engine, [(prompt, params(seed, verify=True))])[0]
        canvas = out["passes"][-1].argmax_ids  # the committed canvas: the last pass's argmax
        answer = out["answer_ids"]
        with torch.inference_mode():
            logits = engine.loaded.model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([canvas]))
        lp = torch.log_softmax(logits.logits[0].float(), dim=-1)
        expected = [lp[i, t].item() for i, t in enumerate(answer) if t != 1]
        assert canvas[: len(answer)] == answer and expected
        assert out["finish"].verified_logprob == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_verified_rows_keep_their_tokens_alone_and_batched(engine):
    """Rows that verify give the same passes and answers as rows that do not, across canvases (the score pass
    runs before the commit's encoder pass) and in a batch; their scores are the same alone and batched."""
    long = dict(max_tokens=200, eos_token_ids=[])  # several canvases of the tiny model
    plain = [run_to_end(engine, [(p, params(s, **long))])[0] for p, s in zip(PROMPTS, (7, 8, 9), strict=True)]
    alone = [
        run_to_end(engine, [(p, params(s, verify=True, **long))])[0] for p, s in zip(PROMPTS, (7, 8, 9), strict=True)
    ]
    batched = run_to_end(engine, [(p, params(s, verify=True, **long)) for p, s in zip(PROMPTS, (7, 8, 9), strict=True)])
    assert max(len(r["commits"]) for r in plain) > 1
    for a, b, c in zip(plain, alone, batched, strict=True):
        assert a["answer_ids"] == b["answer_ids"] == c["answer_ids"]
        assert [e.argmax_ids for e in a["passes"]] == [e.argmax_ids for e in c["passes"]]
        assert a["finish"].verified_logprob is None
        assert math.isfinite(b["finish"].verified_logprob) and b["finish"].verified_logprob < 0
        assert c["finish"].verified_logprob == pytest.approx(b["finish"].verified_logprob, abs=1e-5)
