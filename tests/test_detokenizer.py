"""Stop strings and held-back text across canvas boundaries."""

from __future__ import annotations

from engine.detokenizer import TextStream


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_stop_string_split_over_two_commits(tokenizer):
    stream = TextStream(tokenizer, stop=["END"])
    first, second = ids(tokenizer, "hello world E"), ids(tokenizer, "ND and more")
    delta, match = stream.add(first)
    assert match is None and delta == "hello world "  # "E" may start the stop string: held back
    delta, match = stream.add(second)
    assert match is not None and delta == "" and match.text == "hello world "
    assert stream.flush() == ""
    # Usage counts just the tokens that produce the kept text.
    assert len(tokenizer.decode(stream.token_ids)) >= len("hello world ")
    assert len(tokenizer.decode(stream.token_ids[:-1])) < len("hello world ")


def test_no_stop_flushes_everything(tokenizer):
    stream = TextStream(tokenizer, stop=["zzz"])
    delta, _ = stream.add(ids(tokenizer, "the list of values z"))
    assert delta == "the list of values "
    assert stream.flush() == "z"


def test_earliest_of_several_stops_wins(tokenizer):
    stream = TextStream(tokenizer, stop=["values", "list"])
    delta, match = stream.add(ids(tokenizer, "the list of values"))
    assert match.text == "the " and delta == "the "


def test_incomplete_utf8_is_held_back(tokenizer):
    stream = TextStream(tokenizer)
    full = ids(tokenizer, "caf\u00e9 ok")
    # Feed token by token: no delta may ever contain a replacement character.
    out = ""
    for t in full:
        delta, _ = stream.add([t])
        assert "\ufffd" not in delta
        out += delta
    out += stream.flush()
    assert out == "caf\u00e9 ok"
