"""logprobs over HTTP: one entry per committed token, under the committing pass's distribution."""

from __future__ import annotations

import math

import pytest

FAST = {"denoising_steps": 3}
MESSAGES = [{"role": "user", "content": "Say something."}]


def special_names(tokenizer) -> set[str]:
    return set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}


def check_chat_entries(entries, top: int, content: str, tokenizer, cut: bool = False) -> None:
    """`cut`: a stop string ended the answer, possibly inside the last token (which then counts, as in usage)."""
    for e in entries:
        assert e.logprob <= 0 and math.isfinite(e.logprob)
        assert e.bytes is not None and bytes(e.bytes).decode("utf-8", errors="replace") == e.token
        values = [t.logprob for t in e.top_logprobs]
        assert len(values) == top and values == sorted(values, reverse=True)
        if top:
            # The committed canvas is the committing pass's argmax, so the chosen token is the top alternative.
            assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
    # The entries' bytes spell the answer (special tokens, which the text leaves out, aside).
    specials = special_names(tokenizer)
    spelled = b"".join(bytes(e.bytes) for e in entries if e.token not in specials).decode("utf-8", errors="replace")
    if cut:
        assert spelled.startswith(content) and len(spelled) - len(content) < len(entries[-1].token)
    else:
        assert spelled == content


@pytest.mark.parametrize("top", [0, 5, 20])
def test_chat_logprobs_match_the_committed_tokens(client, tokenizer, top):
    r = client.chat.completions.create(model="tiny-random", messages=MESSAGES, max_tokens=70, seed=11, logprobs=True,
                                       top_logprobs=top, extra_body=FAST)  # fmt: skip
    choice = r.choices[0]
    entries = choice.logprobs.content
    eos = 1 if choice.finish_reason == "stop" else 0  # EOS counts as a completion token but is not reported
    assert len(entries) == r.usage.completion_tokens - eos
    check_chat_entries(entries, top, choice.message.content, tokenizer)


def test_no_logprobs_unless_asked(client):
    r = client.chat.completions.create(model="tiny-random", messages=MESSAGES, max_tokens=8, seed=1, extra_body=FAST)
    assert r.choices[0].logprobs is None


def test_logprobs_with_n_and_stop_strings(client, tokenizer):
    full = client.chat.completions.create(model="tiny-random", messages=MESSAGES, max_tokens=64, seed=3, n=2,
                                          extra_body=FAST)  # fmt: skip
    # A stop string taken from the middle of the first answer cuts it there.
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    r = client.chat.completions.create(model="tiny-random", messages=MESSAGES, max_tokens=64, seed=3, n=2,
                                       stop=[stop], logprobs=True, top_logprobs=2, extra_body=FAST)  # fmt: skip
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].message.content
    for choice in r.choices:
        check_chat_entries(choice.logprobs.content, 2, choice.message.content, tokenizer, cut=True)
    assert r.choices[0].logprobs.content != r.choices[1].logprobs.content


def test_streamed_logprobs_arrive_with_their_canvas(client, tokenizer):
    kwargs = dict(model="tiny-random", messages=MESSAGES, max_tokens=80, seed=5, logprobs=True, top_logprobs=3,
                  extra_body=FAST)  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    streamed, content = [], []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                assert c.logprobs.content  # logprobs only ride on chunks that have some
                streamed.extend(c.logprobs.content)
            content.append(c.delta.content or "")
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    check_chat_entries(streamed, 3, "".join(content), tokenizer)


def test_completion_logprobs_legacy_shape(client):
    r = client.completions.create(model="tiny-random", prompt="Once upon", max_tokens=40, seed=2, logprobs=3,
                                  extra_body=FAST)  # fmt: skip
    lp = r.choices[0].logprobs
    n = len(lp.tokens)
    assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and max(top.values()) == value and top[token] == value


def test_grammar_rows_report_only_allowed_alternatives(client):
    choice = {"structured_outputs": {"choice": ["yes", "no"]}}
    r = client.chat.completions.create(model="tiny-random", messages=MESSAGES, max_tokens=16, seed=4, logprobs=True,
                                       top_logprobs=5, extra_body={**FAST, **choice})  # fmt: skip
    entries = r.choices[0].logprobs.content
    assert r.choices[0].message.content in ("yes", "no")
    # The grammar leaves only the choices' tokens possible: fewer than 5 alternatives, all finite.
    assert all(len(e.top_logprobs) < 5 and all(math.isfinite(t.logprob) for t in e.top_logprobs) for e in entries)
