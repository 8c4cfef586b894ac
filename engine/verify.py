"""The verification pass: a finished canvas scored by the denoiser itself.

DiffusionGemma learns to recover answers from uniformly renoised canvases, so any input token may be noise and the
denoiser judges each one against all the others. One more decoder pass over a committed canvas, taken as its own
input with no self-conditioning, gives each token's log-probability given the whole answer around it: a
pseudo-log-likelihood, as masked language models are scored, from a single pass instead of one per token.

The log-probabilities the committing passes report (`logprobs`) are each token's at the pass that accepted it,
when much of the canvas was still noise; a wrong token that looked likely then still looks likely. Seen against
the finished answer it does not: on tiny-sudoku's validation puzzles, ranking 16 candidates by their mean
verification log-probability solved 51% / 87% at 26-31 / 32-40 givens, with a right candidate among them for 51% /
89%, against 41% / 83% by the committing passes' weakest token (models/tiny-sudoku/eval.md). It costs one pass
per canvas for each row that asks (`SamplingParams.verify`) and changes none of the row's tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner
    from engine.request import DenoiseState


@torch.inference_mode()
def canvas_logprobs(runner: ModelRunner, rows: list[tuple[DenoiseState, list[int]]]) -> list[list[float]]:
    """Per row, the log-probability of each token of `ids` (a finished canvas of that row) in one batched decoder
    pass over those canvases, with the rows' caches and positions as for their current canvas and no
    self-conditioning. One host copy for the batch; the rows' own canvases and self-conditioning are left as
    they were."""
    if not rows:
        return []
    states = [s for s, _ in rows]
    device = runner.device
    ids = torch.tensor([canvas for _, canvas in rows], dtype=torch.long, device=device)
    saved = [(s.canvas, s.self_conditioning) for s in states]
    try:
        for i, s in enumerate(states):
            s.canvas, s.self_conditioning = ids[i], None
        logits = runner.denoise_logits(states)
    finally:
        for s, (canvas, sc) in zip(states, saved, strict=True):
            s.canvas, s.self_conditioning = canvas, sc
    chosen = logits.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return chosen.cpu().tolist()
