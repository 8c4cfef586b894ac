"""Test helpers: drive the synchronous engine to completion and collect its events."""

from __future__ import annotations

from engine.constraints import CanvasConstraints
from engine.engine import LLMEngine
from engine.events import CommitEvent, FinishEvent, PassEvent


def run_to_end(engine: LLMEngine, requests: list[tuple]) -> list[dict]:
    """Run requests together through engine.step() and return, per request, its events by kind. A request is
    (prompt, params), optionally followed by an llguidance grammar and whether it masks every pass, or by
    CanvasConstraints."""
    states = []
    results: dict[str, dict] = {}
    for prompt, params, *extra in requests:
        constraints = next((x for x in extra if isinstance(x, CanvasConstraints)), None)
        constraint = [x for x in extra if not isinstance(x, CanvasConstraints)]
        grammar = engine.compile_grammar(constraint[0]) if constraint and constraint[0] else None
        in_pass = constraint[1] if len(constraint) > 1 else True
        state = engine.make_request(prompt, params, grammar=grammar, grammar_in_pass=in_pass, constraints=constraints)
        results[state.request_id] = {"passes": [], "commits": [], "finish": None}
        states.append(state)
        engine.add_request(state)

    def emit(state, event):
        slot = results[state.request_id]
        if isinstance(event, PassEvent):
            slot["passes"].append(event)
        elif isinstance(event, CommitEvent):
            slot["commits"].append(event)
        elif isinstance(event, FinishEvent):
            slot["finish"] = event

    while engine.has_unfinished():
        engine.step(emit)
    out = []
    for state in states:
        slot = results[state.request_id]
        slot["answer_ids"] = state.answer_ids
        slot["state"] = state
        slot["tokens_per_forward"] = state.tokens_per_forward
        out.append(slot)
    return out
