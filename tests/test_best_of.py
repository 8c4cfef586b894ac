"""best_of and reasoning_effort high over HTTP: candidate rows per prompt, the most confident answer returned."""

from __future__ import annotations

import pytest

FAST = {"denoising_steps": 4}
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me something."}]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


def score(values: list[float]) -> tuple[float, float]:
    """An answer's least likely token and its mean log-probability, at the passes that committed them."""
    return (min(values), mean(values)) if values else (float("-inf"), float("-inf"))


def ranking(info: dict, candidates: list) -> list[int]:
    """What best_of ranks by: each candidate's verification score (from the response; tests/test_verify.py checks
    the engine's against transformers' forward), then its least likely and its mean committed token."""
    keys = [(c["verified_logprob"], *candidates[i][1]) for i, c in enumerate(info["candidates"])]
    return sorted(range(len(keys)), key=lambda i: keys[i], reverse=True)


def alone(client, seed: int, k: int) -> list[tuple[str, tuple[float, float], int]]:
    """Each candidate as its own request (row i of a best_of request has seed + i): text, score, tokens."""
    out = []
    for i in range(k):
        r = client.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=24, seed=seed + i, logprobs=0,
                                      extra_body=FAST)  # fmt: skip
        c = r.choices[0]
        out.append((c.text, score(c.logprobs.token_logprobs), r.usage.completion_tokens))
    return out


def test_best_of_returns_the_most_confident_candidate(client):
    seed, k = 25, 4
    candidates = alone(client, seed, k)
    assert len({text for text, _, _ in candidates}) > 1  # the candidates differ, so the choice matters
    r = client.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=24, seed=seed, best_of=k,
                                  extra_body=FAST)  # fmt: skip
    assert len(r.choices) == 1
    choice = r.choices[0]
    info = choice.model_extra["diffusion"]["best_of"]
    best = ranking(info, candidates)[0]
    # Here the verification pass decides: the weakest committed token would have picked another answer.
    assert best != max(range(k), key=lambda i: candidates[i][1])
    assert choice.text == candidates[best][0]
    assert choice.logprobs is None  # ranked by log-probabilities, returned only when asked for
    assert info["chosen"] == best
    assert [c["min_logprob"] for c in info["candidates"]] == pytest.approx([s[0] for _, s, _ in candidates], abs=1e-3)
    assert [c["mean_logprob"] for c in info["candidates"]] == pytest.approx([s[1] for _, s, _ in candidates], abs=1e-3)
    assert [c["completion_tokens"] for c in info["candidates"]] == [n for _, _, n in candidates]
    # As vLLM: usage bills the returned answer.
    assert r.usage.completion_tokens == candidates[best][2]


def test_best_of_with_n_returns_the_top_n_in_order(client):
    seed, k = 5, 5
    candidates = alone(client, seed, k)
    r = client.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=24, seed=seed, best_of=k, n=2,
                                  logprobs=1, extra_body=FAST)  # fmt: skip
    order = ranking(r.choices[0].model_extra["diffusion"]["best_of"], candidates)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [candidates[order[0]][0], candidates[order[1]][0]]
    assert [c.model_extra["diffusion"]["best_of"]["chosen"] for c in r.choices] == order[:2]
    # Log-probabilities asked for come with the chosen answers, one per token.
    assert score(r.choices[0].logprobs.token_logprobs) == pytest.approx(candidates[order[0]][1], abs=1e-5)
    assert r.usage.completion_tokens == candidates[order[0]][2] + candidates[order[1]][2]


def test_best_of_streams_every_candidates_drafts_then_the_chosen_answer(client):
    kw = dict(model="tiny-random", messages=MESSAGES, max_tokens=24, seed=8)
    whole = client.chat.completions.create(**kw, extra_body={**FAST, "best_of": 3})
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True},
                                            extra_body={**FAST, "best_of": 3})  # fmt: skip
    candidates, content, finish, usage = set(), "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            assert c.index == 0
            draft = (c.model_extra or {}).get("draft")
            if draft is not None:
                assert content == ""  # drafts come before the answer
                candidates.add(draft["candidate"])
            content += c.delta.content or ""
            if c.finish_reason is not None:
                finish = c
    assert candidates == {0, 1, 2}
    assert content == whole.choices[0].message.content
    assert finish.model_extra["diffusion"] == whole.choices[0].model_extra["diffusion"]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_reasoning_effort_high_picks_among_candidates(client):
    kw = dict(model="tiny-random", messages=MESSAGES, max_tokens=16, seed=2)
    low = client.chat.completions.create(reasoning_effort="low", **kw).choices[0].model_extra["diffusion"]
    high = client.chat.completions.create(reasoning_effort="high", **kw).choices[0].model_extra["diffusion"]
    assert "best_of" not in low
    assert len(high["best_of"]["candidates"]) == 64
    # An explicit best_of overrides the effort's.
    one = client.chat.completions.create(reasoning_effort="high", extra_body={"best_of": 1}, **kw)
    assert "best_of" not in one.choices[0].model_extra["diffusion"]
