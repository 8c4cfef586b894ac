"""Unit tests of the denoising math: schedule, entropy, acceptance, renoising and the stop rule."""

from __future__ import annotations

import math

import pytest
import torch

from engine import denoise
from engine.sampling_params import SamplingParams, SamplingParamsError


def test_schedule_is_hot_first_and_linear():
    temps = [float(denoise.pass_temperature(k, 4, 0.4, 0.8)) for k in (4, 3, 2, 1)]
    assert temps == pytest.approx([0.8, 0.7, 0.6, 0.5])
    # The last pass stops one step short of t_min, as in the reference (k counts down to 1, not 0).
    assert float(denoise.pass_temperature(1, 48, 0.4, 0.8)) == pytest.approx(0.4 + 0.4 / 48)
    assert denoise.pass_temperature(3, 7, 0.1, 0.9).dtype == torch.float32


def test_entropy_matches_categorical_and_is_chunked():
    logits = torch.randn(3, 70, 50) * 3
    ours = denoise.token_entropy(logits)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.equal(ours, ref)
    assert denoise.token_entropy(torch.zeros(1, 5, 8))[0, 0] == pytest.approx(math.log(8))
    # -inf logits (masked tokens) contribute nothing rather than NaN.
    masked = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert denoise.token_entropy(masked)[0] == pytest.approx(math.log(2))


def test_accept_lowest_entropy_within_bound():
    entropy = torch.tensor([0.5, 0.01, 0.02, 3.0, 0.04])
    # sorted: .01 .02 .04 .5 3.0 -> cum-minus-max: 0, .01, .03, .07, .57
    assert denoise.accept_mask(entropy, 0.1).tolist() == [True, True, True, False, True]
    assert denoise.accept_mask(entropy, 0.02).tolist() == [False, True, True, False, False]
    assert denoise.accept_mask(entropy, 0.005).tolist() == [False, True, False, False, False]


def test_accept_always_takes_at_least_one_and_all_under_wide_bound():
    entropy = torch.full((6,), 5.0)
    assert denoise.accept_mask(entropy, 1e-9).sum() == 1  # the single lowest is always free
    assert denoise.accept_mask(entropy, 1e9).all()


def test_renoise_keeps_accepted_and_redraws_the_rest():
    g = torch.Generator().manual_seed(0)
    current = torch.zeros(8, dtype=torch.long)
    proposed = torch.arange(100, 108)
    accepted = torch.tensor([True, False, True, False, False, False, False, True])
    out = denoise.renoise(current, proposed, accepted, 50, g)
    assert out[accepted].tolist() == [100, 102, 107]
    assert ((out[~accepted] >= 0) & (out[~accepted] < 50)).all()
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(out, denoise.renoise(current, proposed, accepted, 50, g2))


def stable(history: torch.Tensor, argmax_canvas: torch.Tensor) -> bool:
    return bool(denoise.stable_flag(history, argmax_canvas))


def confident(entropy: torch.Tensor, threshold: float) -> bool:
    return bool(denoise.confident_flags(entropy.mean(), torch.tensor(threshold)))


def test_stop_rule_needs_stable_and_confident():
    a = torch.tensor([1, 2, 3])
    history = torch.full((1, 3), -1)
    assert not stable(history, a)
    history = denoise.push_history(history, a)
    assert stable(history, a)
    assert not stable(history, torch.tensor([1, 2, 4]))
    # Threshold 0: always stable.
    assert stable(torch.empty((0, 3), dtype=torch.long), a)
    # Threshold 2 needs two equal predecessors.
    h2 = torch.full((2, 3), -1)
    h2 = denoise.push_history(h2, a)
    assert not stable(h2, a)
    h2 = denoise.push_history(h2, a)
    assert stable(h2, a)
    assert confident(torch.tensor([0.001, 0.002]), 0.005)
    assert not confident(torch.tensor([0.001, 0.02]), 0.005)


def test_greedy_proposal_is_argmax_and_draws_nothing():
    logits = torch.randn(4, 10)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert torch.equal(denoise.propose_canvas(logits, True, 1.0, g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("shape", [(7, 33), (32, 1024), (3, 32, 4096)])
def test_exponential_draws_are_the_kernels_own(shape):
    """The proposal's Exp(1) race is drawn from uniforms on CPU: the same numbers, and the same generator
    state afterwards, as torch's exponential_ kernel (which transformers' multinomial sampling uses)."""
    kernel = torch.Generator().manual_seed(3)
    ours = torch.Generator().manual_seed(3)
    for _ in range(2):
        expected = torch.empty(shape).exponential_(1, generator=kernel)
        got = denoise.exponential_draws(shape, ours, "cpu")
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)
    assert torch.equal(torch.randint(0, 1000, (16,), generator=kernel), torch.randint(0, 1000, (16,), generator=ours))


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = denoise.nucleus_filter(logits, 0.7)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    assert torch.isfinite(denoise.nucleus_filter(logits, 0.5)).sum() == 1
    g = torch.Generator().manual_seed(0)
    draws = {int(denoise.propose_canvas(logits, False, 0.7, g)[0]) for _ in range(50)}
    assert draws <= {0, 1}


@pytest.mark.parametrize(
    "change,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"denoising_steps": 0}, "denoising_steps"),
        ({"entropy_bound": 0.0}, "entropy_bound"),
        ({"t_min": 0.9, "t_max": 0.5}, "t_min"),
        ({"confidence_threshold": 0.0}, "confidence_threshold"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_sampling_params_validation_names_the_field(change, param):
    with pytest.raises(SamplingParamsError) as exc:
        SamplingParams(**change).validate()
    assert exc.value.param == param


def test_sampling_params_defaults_are_the_reference_defaults():
    p = SamplingParams()
    assert (p.denoising_steps, p.entropy_bound, p.t_min, p.t_max) == (48, 0.1, 0.4, 0.8)
    assert (p.stability_threshold, p.confidence_threshold) == (1, 0.005)
    SamplingParams(t_min=0.0, t_max=0.0).validate()  # greedy is valid


def test_a_chosen_token_leads_the_tokens_as_probable_as_it():
    """logprobs' first alternative is the committed token when other tokens tie with it (ties are common in
    bf16 logits), whichever order topk returns equal values in; a tie cut off by `top` keeps the chosen one."""
    logits = torch.zeros(3, 100_000)
    logits[:, 3] = logits[:, 70_000] = 1.0  # two most probable tokens, equally so (topk here lists 70000 first)
    logits[2, 5] = 2.0
    tokens = torch.tensor([3, 70_000, 3])
    chosen, ids, values = denoise.token_logprobs(logits, tokens, 2)
    assert ids.tolist() == [[3, 70_000], [70_000, 3], [5, 3]]
    assert values[0, 0] == chosen[0] and values[1, 0] == chosen[1] and values[2, 1] == chosen[2]
    assert all(v == sorted(v, reverse=True) for v in values.tolist())
    _, ids, _ = denoise.token_logprobs(logits, torch.tensor([3, 3, 3]), 1)
    assert ids[:, 0].tolist() == [3, 3, 5]
