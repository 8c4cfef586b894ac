"""best_of: several candidate answers per prompt, denoised side by side, answered with the most confident.

OpenAI's `best_of` (on /v1/completions; Press accepts it on chat completions too) and `reasoning_effort: "high"`
run `best_of` rows per prompt in the same batched passes, each with its own seed, and return the `n` answers the
model is most confident of. Each row's finished canvases get BEST_OF_VERIFY_PASSES more decoder passes, each
hiding every 9th token behind noise (engine/verify.py), and the answers rank by the mean log-probability of their
tokens where hidden (ties: the highest lowest log-probability at the passes that committed them, then the highest
mean there). OpenAI ranks by the mean log-probability per token as sampled; judged against the rest of the
finished answer instead, the ranking nearly always picked a right answer on tiny-sudoku when one of the
candidates was right (best of 64: 72% / 97% of 26-31 / 32-40-given validation puzzles solved, with a right
candidate for 77% / 99%; one pass over the canvas hiding nothing picked 66% / 94%, and the weakest committed token
of 32 candidates 47% / 85%; see models/tiny-sudoku/eval.md). A row that answers nothing ranks last.

A prompt's answers are known only when all its rows have finished, so with `stream: true` the drafts of every
candidate stream as they come (tagged `draft.candidate`, under the prompt's first choice index) and each kept
answer arrives whole once its prompt's rows are done. As vLLM, usage bills the returned answers; what every
candidate scored is in the choice's `diffusion.best_of` object.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from engine.events import CommitEvent, Event, FinishEvent, PassEvent
from engine.sampling_params import REASONING_EFFORT_BEST_OF

# Rows per prompt at most (OpenAI caps best_of at 20; each row is a full canvas in every pass): as many as
# reasoning_effort high denoises.
MAX_BEST_OF = REASONING_EFFORT_BEST_OF["high"]


def answer_score(logprobs: Sequence[float], verified: float | None = None) -> tuple[float, float, float]:
    """(verified, lowest, mean): the answer's mean verification log-probability (FinishEvent.verified_logprob), then
    the lowest and mean log-probability of its tokens at the passes that committed them; -inf for what is missing
    (an empty answer, or a row that was not verified). Higher is better."""
    v = verified if verified is not None else -math.inf
    if not logprobs:
        return (v, -math.inf, -math.inf)
    return (v, min(logprobs), sum(logprobs) / len(logprobs))


def rank(scores: Sequence[tuple[float, ...]]) -> list[int]:
    """Candidate indices, best score first (compared in order; ties: the lower index)."""
    return sorted(range(len(scores)), key=lambda i: (*(-x for x in scores[i]), i))


@dataclass
class Candidate:
    commits: list[CommitEvent] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishEvent | None = None


class BestOf:
    """Engine rows grouped `group` per prompt (prompt-major); each prompt answers with its `keep` best rows.

    `events` turns the rows' merged events into choice events: (choice index, event, candidate). Drafts pass
    through at once (candidate = the row within its prompt); commits are held per row and replayed for the kept
    rows, best first, when the prompt's last row finishes (candidate None). Rows must have been asked for
    log-probabilities; `logprobs_wanted` False strips them from what is replayed."""

    def __init__(self, group: int, keep: int, prompts: int, logprobs_wanted: bool) -> None:
        self.group, self.keep = group, keep
        self.logprobs_wanted = logprobs_wanted
        self.rows = [Candidate() for _ in range(prompts * group)]
        self.details: dict[int, dict] = {}  # choice index -> its `diffusion.best_of` object

    @property
    def choices(self) -> int:
        return len(self.rows) // self.group * self.keep

    async def events(self, rows: AsyncIterator[tuple[int, Event]]) -> AsyncIterator[tuple[int, Event, int | None]]:
        async for row, event in rows:
            p, c = divmod(row, self.group)
            cand = self.rows[row]
            if isinstance(event, PassEvent):
                yield p * self.keep, event, c
            elif isinstance(event, CommitEvent):
                cand.logprobs.extend(t.logprob for t in event.logprobs or [])
                cand.commits.append(event if self.logprobs_wanted else replace(event, logprobs=None))
            elif isinstance(event, FinishEvent):
                if event.finish_reason == "error":
                    yield p * self.keep, event, c
                    continue
                cand.finish = event
                group = self.rows[p * self.group : (p + 1) * self.group]
                if any(r.finish is None for r in group):
                    continue
                scores = [answer_score(r.logprobs, r.finish.verified_logprob) for r in group]  # type: ignore[union-attr]
                order = rank(scores)
                summary = [
                    {
                        "verified_logprob": round(s[0], 4) if math.isfinite(s[0]) else None,
                        "min_logprob": round(s[1], 4) if math.isfinite(s[1]) else None,
                        "mean_logprob": round(s[2], 4) if math.isfinite(s[2]) else None,
                        "passes": r.finish.passes,
                        "completion_tokens": r.finish.completion_tokens,
                        "finish_reason": r.finish.finish_reason,
                    }
                    for s, r in zip(scores, group, strict=True)
                ]
                for j, i in enumerate(order[: self.keep]):
                    choice = p * self.keep + j
                    self.details[choice] = {"chosen": i, "candidates": summary}
                    for commit in group[i].commits:
                        yield choice, commit, None
                    yield choice, group[i].finish, None  # type: ignore[misc]
