"""What the engine reports about a request: one event per pass, per committed canvas, and at the end."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassEvent:
    """One refinement pass of a canvas. `draft_text` is the argmax canvas, cut at EOS, when drafts are on."""

    canvas_index: int
    pass_index: int
    argmax_ids: list[int]
    accepted: int
    accepted_mask: list[bool]  # per canvas position: accepted in this pass
    canvas_length: int
    mean_entropy: float
    draft_text: str | None = None
    # Character spans [start, end) of `draft_text` that are fixed tokens (infill templates), when there are any.
    fixed_spans: list[tuple[int, int]] | None = None
    fixed_positions: list[int] | None = None  # canvas positions a template fixed

    @property
    def accepted_fraction(self) -> float:
        return self.accepted / self.canvas_length


@dataclass(frozen=True)
class TokenLogprob:
    """One committed token's log-probability and the most probable alternatives (token id, log-probability),
    under the sampling distribution of the pass that committed its canvas."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class CommitEvent:
    """A canvas was committed. `token_ids` are its answer tokens (cut at EOS, stop or max_tokens); `text`
    is the newly safe text: held back while it could still be the start of a stop string. `logprobs`, when
    the request asked for them: one entry per answer token that is not EOS."""

    canvas_index: int
    token_ids: list[int]
    text: str
    passes: int
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class FinishEvent:
    """The request ended. `finish_reason`: stop (EOS or stop string), length, abort or error."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    canvases: int
    passes: int
    tokens_per_forward: float
    text: str = ""
    error: str | None = None
    # Rows with template holes: the mean log-probability of the template's tokens, holes as filled and fixed text
    # as the model scored it, at the passes that committed them (a confidence: fill-in-the-middle's choice).
    template_logprob: float | None = None
    fixed_tokens: int | None = None  # rows with a template: how many answer tokens it fixed
    # Rows started from a prediction: predicted tokens the answer kept at their positions, and the others.
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None
    # Rows with params.verify: the mean log-probability of the answer's tokens (EOS excluded) in the verification
    # pass over each committed canvas (engine/verify.py); None for an empty answer.
    verified_logprob: float | None = None


Event = PassEvent | CommitEvent | FinishEvent
