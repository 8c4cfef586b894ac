"""Grammar-constrained canvases in the engine: validity across canvases, forced positions, batch invariance."""

from __future__ import annotations

import re

import pytest
from llguidance import LLMatcher, grammar_from

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams, SamplingParamsError
from engine.tiny_random import EOS_TOKEN_IDS
from tests.helpers import run_to_end
from tests.test_batching import varied_requests

PROMPT = [2, 4, 300, 301, 302, 5, 4]


@pytest.fixture(scope="module")
def grammar_engine(tiny_path):
    return LLMEngine(EngineConfig(compile=False, model=str(tiny_path), max_num_seqs=8))


def params(seed: int, max_tokens: int = 128, steps: int = 4, **kw) -> SamplingParams:
    eos = list(EOS_TOKEN_IDS)  # the checkpoint's: a grammar ends on any of them
    return SamplingParams(max_tokens=max_tokens, denoising_steps=steps, seed=seed, eos_token_ids=eos, **kw)


def text_of(engine: LLMEngine, result: dict) -> str:
    return engine.tokenizer.decode(result["answer_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("in_pass", [True, False], ids=["in-pass", "commit-only"])
def test_grammar_state_carries_across_canvases(grammar_engine, in_pass):
    # 60 digit groups cannot fit one 32-token canvas: the walk must resume where the last canvas ended.
    regex = r"(<[0-9]{2}>){30}"
    grammar = LLMatcher.grammar_from_regex(regex)
    results = run_to_end(grammar_engine, [(PROMPT, params(seed, max_tokens=200), grammar, in_pass) for seed in (1, 2)])
    for r in results:
        assert r["finish"].finish_reason == "stop"
        assert r["finish"].canvases >= 3
        assert re.fullmatch(regex, text_of(grammar_engine, r))


def test_forced_positions_are_accepted_and_never_renoised(grammar_engine):
    literal = "Order status report: "
    grammar = grammar_from("lark", f'start: "{literal}" ("open" | "shipped")')
    forced = grammar_engine.compile_grammar(grammar).compute_ff_tokens()  # what the grammar forces up front
    assert len(forced) >= 8
    state = grammar_engine.make_request(PROMPT, params(3, steps=6), grammar=grammar_engine.compile_grammar(grammar))
    grammar_engine.add_request(state)
    canvases, accepted = [], []
    while grammar_engine.has_unfinished():
        grammar_engine.step(lambda s, e: accepted.append(getattr(e, "accepted", None)))
        if state.canvas is not None and state.canvas_index == 0:
            canvases.append(state.canvas[: len(forced)].tolist())
    assert text_of(grammar_engine, {"answer_ids": state.answer_ids}) in (literal + "open", literal + "shipped")
    # Every pass kept the forced tokens in the decoder's canvas (accepted with zero entropy, never renoised)...
    assert canvases and all(c == forced for c in canvases)
    # ...and counts them as accepted, which an unconstrained pass of this random model never reaches.
    assert min(a for a in accepted if a is not None) >= len(forced)


def test_commit_only_keeps_the_passes_unconstrained(grammar_engine):
    grammar = grammar_from("lark", 'start: "Order status report: " ("open" | "shipped")')
    plain = run_to_end(grammar_engine, [(PROMPT, params(3, steps=6, include_drafts=True))])[0]
    commit_only = run_to_end(grammar_engine, [(PROMPT, params(3, steps=6, include_drafts=True), grammar, False)])[0]

    # The first canvas is refined exactly as without a grammar (later canvases follow different commits).
    def first_canvas(run):
        return [p.argmax_ids for p in run["passes"] if p.canvas_index == 0]

    assert first_canvas(commit_only) and first_canvas(commit_only) == first_canvas(plain)
    assert text_of(grammar_engine, commit_only) in ("Order status report: open", "Order status report: shipped")


def test_seeded_constrained_rows_are_batch_invariant(grammar_engine):
    grammars = [
        LLMatcher.grammar_from_json_schema(
            {
                "type": "object",
                "properties": {
                    "n": {"type": "integer", "minimum": 0, "maximum": 99},
                    "s": {"type": "string", "maxLength": 5},
                },
                "required": ["n", "s"],
                "additionalProperties": False,
            },
            overrides={"whitespace_flexible": False},
        ),
        LLMatcher.grammar_from_regex(r"[a-z]{3}(-[0-9]{3}){5}"),
        grammar_from("choice", ["yes", "no", "call me back"]),
    ]
    constrained = [(PROMPT, params(40 + i, max_tokens=96, steps=3 + i), g, i != 1) for i, g in enumerate(grammars)]
    unconstrained = varied_requests(5, seed=3)
    alone = [run_to_end(grammar_engine, [r])[0] for r in constrained]
    together = run_to_end(grammar_engine, [*unconstrained[:2], *constrained, *unconstrained[2:]])[2:5]
    for a, b in zip(alone, together, strict=True):
        assert a["answer_ids"] == b["answer_ids"]
        assert a["finish"].passes == b["finish"].passes
        assert a["finish"].finish_reason == "stop"


def test_greedy_and_max_tokens_under_a_grammar(grammar_engine):
    grammar = LLMatcher.grammar_from_regex(r"[0-9]{40}")
    greedy = params(7, max_tokens=64, t_min=0.0, t_max=0.0)
    r = run_to_end(grammar_engine, [(PROMPT, greedy, grammar), (PROMPT, params(7, max_tokens=5), grammar)])
    assert r[0]["finish"].finish_reason == "stop" and re.fullmatch("[0-9]{40}", text_of(grammar_engine, r[0]))
    # Too few tokens for the grammar: cut, and said so.
    assert r[1]["finish"].finish_reason == "length" and len(r[1]["answer_ids"]) == 5


def test_ignore_eos_is_refused_with_a_grammar(grammar_engine):
    matcher = grammar_engine.compile_grammar(LLMatcher.grammar_from_regex("a+"))
    with pytest.raises(SamplingParamsError) as err:
        grammar_engine.make_request(PROMPT, params(0).with_changes(eos_token_ids=[]), grammar=matcher)
    assert err.value.param == "ignore_eos"
