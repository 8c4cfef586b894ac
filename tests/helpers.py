"""Test helpers: drive the synchronous engine to completion and collect its events."""

from __future__ import annotations

from engine.engine import LLMEngine
from engine.events import CommitEvent, FinishEvent, PassEvent
from engine.sampling_params import SamplingParams


def run_to_end(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[dict]:
    """Run requests together through engine.step() and return, per request, its events by kind."""
    states = []
    results: dict[str, dict] = {}
    for prompt, params in requests:
        state = engine.make_request(prompt, params)
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
        slot["tokens_per_forward"] = state.tokens_per_forward
        out.append(slot)
    return out
