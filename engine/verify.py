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

That single pass shows each token to itself, and the denoiser, trained mostly on clean tokens, partly copies it.
With `verify` = K > 1 the score is a pseudo-log-likelihood of hidden tokens instead: K passes, pass g replacing
every position p with p % K == g by a noise token (one fixed uniform draw, the same for every row, so a row's score
does not depend on its batch) and scoring those positions only. A stride spreads each pass's hidden tokens across
the canvas, so every hidden token keeps its neighbours; on tiny-sudoku, where the canvas holds rows of 10 tokens,
a stride of 9 hides one cell per row and column. Ranking 64 candidates that way picked a right one for 97% of
32-40-given validation puzzles against 94% for the single pass (models/tiny-sudoku/eval.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.denoise import random_canvas

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner
    from engine.request import DenoiseState


NOISE_SEED = 1234  # the hidden positions' noise tokens: one draw, the same for every row and run


@torch.inference_mode()
def canvas_logprobs(
    runner: ModelRunner, rows: list[tuple[DenoiseState, list[int]]], passes: int = 1
) -> list[list[float]]:
    """Per row, the log-probability of each token of `ids` (a finished canvas of that row), with the rows' caches
    and positions as for their current canvas and no self-conditioning: one batched decoder pass over the
    canvases themselves (`passes` = 1), or `passes` passes each hiding every passes-th position behind noise
    and scoring it (module docstring). One host copy for the batch; the rows' own canvases and
    self-conditioning are left as they were."""
    if not rows:
        return []
    states = [s for s, _ in rows]
    device = runner.device
    ids = torch.tensor([canvas for _, canvas in rows], dtype=torch.long, device=device)
    length = ids.shape[-1]
    if passes > 1:
        vocab = runner.model.config.get_text_config().vocab_size
        noise = random_canvas(length, vocab, torch.Generator().manual_seed(NOISE_SEED), torch.device("cpu")).to(device)
        group = torch.arange(length, device=device) % passes
    scores = torch.zeros(ids.shape, dtype=torch.float32, device=device)
    saved = [(s.canvas, s.self_conditioning) for s in states]
    try:
        for g in range(passes):
            hidden = None if passes == 1 else group == g  # the positions this pass hides and scores
            inputs = ids if hidden is None else torch.where(hidden, noise, ids)
            for i, s in enumerate(states):
                s.canvas, s.self_conditioning = inputs[i], None
            logits = runner.denoise_logits(states)
            chosen = logits.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            scores = chosen if hidden is None else torch.where(hidden, chosen, scores)
            del logits
    finally:
        for s, (canvas, sc) in zip(states, saved, strict=True):
            s.canvas, s.self_conditioning = canvas, sc
    return scores.cpu().tolist()
