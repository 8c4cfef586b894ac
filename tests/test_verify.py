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


@pytest.mark.parametrize("passes", [1, 4])
def test_the_score_is_the_models_log_probability_of_the_finished_canvas(engine, passes):
    """One canvas: the mean, over the answer's tokens (EOS aside), of their log-probabilities computed here with
    transformers' own forward over the prompt and the finished canvas: as it stands (one pass), or with every
    4th position hidden behind the fixed noise in turn, each token scored in the pass that hid it."""
    from engine.denoise import random_canvas
    from engine.verify import NOISE_SEED

    for prompt, seed in zip(PROMPTS, (3, 4, 5), strict=True):
        out = run_to_end(engine, [(prompt, params(seed, verify=passes))])[0]
        canvas = torch.tensor([out["passes"][-1].argmax_ids])  # the committed canvas: the last pass's argmax
        answer = out["answer_ids"]
        length = canvas.shape[-1]
        noise = random_canvas(length, engine.loaded.model.config.get_text_config().vocab_size,
                              torch.Generator().manual_seed(NOISE_SEED), torch.device("cpu"))  # fmt: skip
        lp = None
        for g in range(passes):
            hidden = (torch.arange(length) % passes == g) & (passes > 1)
            with torch.inference_mode():
                logits = engine.loaded.model(
                    input_ids=torch.tensor([prompt]), decoder_input_ids=torch.where(hidden, noise, canvas)
                ).logits[0]
            pass_lp = logits.float().log_softmax(-1)
            lp = pass_lp if lp is None else torch.where(hidden[:, None], pass_lp, lp)
        expected = [lp[i, t].item() for i, t in enumerate(answer) if t != 1]
        assert canvas[0, : len(answer)].tolist() == answer and expected
        assert out["finish"].verified_logprob == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_verified_rows_keep_their_tokens_alone_and_batched(engine):
    """Rows that verify give the same passes and answers as rows that do not, across canvases (the score pass
    runs before the commit's encoder pass) and in a batch that mixes one-pass and hidden-token verification;
    their scores are the same alone and batched, and hiding tokens changes the score."""
    long = dict(max_tokens=200, eos_token_ids=[])  # several canvases of the tiny model
    seeds, passes = (7, 8, 9), (1, 3, 3)
    plain = [run_to_end(engine, [(p, params(s, **long))])[0] for p, s in zip(PROMPTS, seeds, strict=True)]
    alone = [
        run_to_end(engine, [(p, params(s, verify=k, **long))])[0]
        for p, s, k in zip(PROMPTS, seeds, passes, strict=True)
    ]
    batched = run_to_end(
        engine, [(p, params(s, verify=k, **long)) for p, s, k in zip(PROMPTS, seeds, passes, strict=True)]
    )
    one_pass = run_to_end(engine, [(PROMPTS[1], params(seeds[1], verify=1, **long))])[0]
    assert max(len(r["commits"]) for r in plain) > 1
    for a, b, c in zip(plain, alone, batched, strict=True):
        assert a["answer_ids"] == b["answer_ids"] == c["answer_ids"]
        assert [e.argmax_ids for e in a["passes"]] == [e.argmax_ids for e in c["passes"]]
        assert a["finish"].verified_logprob is None
        assert math.isfinite(b["finish"].verified_logprob) and b["finish"].verified_logprob < 0
        assert c["finish"].verified_logprob == pytest.approx(b["finish"].verified_logprob, abs=1e-5)
    assert one_pass["answer_ids"] == alone[1]["answer_ids"]
    assert abs(one_pass["finish"].verified_logprob - alone[1]["finish"].verified_logprob) > 1e-3
