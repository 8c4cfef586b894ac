"""The denoising math of one pass for a whole batch as one graph of tensor ops, for compiled passes.

`denoise.py` works row by row in position chunks and draws from each row's generator as it goes, which is what
keeps the eager engine equal to transformers' `generate()`. Here a row's randomness is drawn first, in the same
order from the same generator (the proposal's Exp(1) race, then the renoising ids), and everything else runs for
all rows at once: temperature, proposal, entropies, acceptance, renoising and the stop rule's statistics. Run
eagerly it computes exactly what the eager sampler does (tests/test_compiled.py checks it); compiled, inductor
fuses it into a few kernels, which may round differently in the last place.

Rows whose logits need per-row processing (top-p, grammar masks, fixed canvas positions) are not for this path;
the engine samples them with the eager sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import denoise


@dataclass
class Draws:
    """One pass's random inputs for a batch: the Exp(1) race of every position and token (unused for greedy rows,
    which draw nothing for their proposal) and the ids that renoise rejected positions. On CPU the race comes from
    float64 uniforms u, as the CPU kernel makes it (Exp(1) = -log1p(-u), see `denoise.exponential_draws`): drawn
    row by row into `uniform`, then transformed for all rows at once."""

    race: torch.Tensor  # (rows, canvas, vocab) float32
    noise: torch.Tensor  # (rows, canvas) int64
    uniform: torch.Tensor | None = None  # (rows, canvas, vocab) float64, on CPU

    @classmethod
    def empty(cls, rows: int, canvas: int, vocab_size: int, device: torch.device) -> Draws:
        shape = (rows, canvas, vocab_size)
        return cls(
            race=torch.ones(shape, device=device),
            noise=torch.zeros((rows, canvas), dtype=torch.long, device=device),
            uniform=torch.empty(shape, dtype=torch.float64) if device.type == "cpu" else None,
        )


def draw(draws: Draws, generators: list[torch.Generator | None], greedy: list[bool], vocab_size: int) -> Draws:
    """Fill `draws` row by row from each row's own generator, in the eager sampler's order (the same numbers as
    `denoise.exponential_draws`); rows past `len(generators)` (batch padding) keep whatever they hold."""
    canvas = draws.noise.shape[1]
    device = draws.noise.device
    rows = len(generators)
    for i, (generator, is_greedy) in enumerate(zip(generators, greedy, strict=True)):
        if draws.uniform is None:
            draws.race[i].fill_(1.0) if is_greedy else draws.race[i].exponential_(1, generator=generator)
        else:  # a greedy row's race goes unused: any uniform will do, but a valid one
            draws.uniform[i].fill_(0.5) if is_greedy else draws.uniform[i].uniform_(generator=generator)
        draws.noise[i] = denoise.random_canvas(canvas, vocab_size, generator, device)
    if draws.uniform is not None and not all(greedy):
        # One transform for all rows: per row it was a third of the draws' time at batch 8 here. (Inside the
        # sampler graph it was slower at batch 8: inductor's float64 log1p.)
        draws.race[:rows].copy_(denoise.exponential_from_uniform_(draws.uniform[:rows]))
    return draws


def sample_batch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    greedy: torch.Tensor,
    race: torch.Tensor,
    noise: torch.Tensor,
    entropy_bound: torch.Tensor,
    history: torch.Tensor,
    history_valid: torch.Tensor,
    confidence_threshold: torch.Tensor,
    sc_dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """One pass for `rows` canvases at once.

    logits (rows, canvas, vocab) fp32; temperature, entropy_bound, confidence_threshold (rows,) fp32; greedy
    (rows,) bool; race and noise from `draw`; history (rows, S, canvas) int64, the last S argmax canvases,
    and history_valid (rows, S) bool, which of them a row's own stability threshold looks at (the last ones).

    Returns the renoised canvases, the argmax canvases, the accepted masks, the pushed histories, the processed
    logits (kept for self-conditioning, in `sc_dtype`) and per row (accepted count, mean entropy, stable,
    confident) as fp32.
    """
    x = logits / temperature[:, None, None]
    argmax = x.argmax(dim=-1)
    log_probs = x - x.logsumexp(dim=-1, keepdim=True)
    entropy = -(log_probs.clamp(min=torch.finfo(x.dtype).min) * torch.softmax(log_probs, dim=-1)).sum(-1)
    sampled = (torch.softmax(x, dim=-1) / race).argmax(dim=-1)
    proposed = torch.where(greedy[:, None], argmax, sampled)
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    keep = sorted_entropy.cumsum(dim=-1) - sorted_entropy <= entropy_bound[:, None]
    accepted = torch.zeros_like(keep).scatter(-1, order, keep)
    canvas = torch.where(accepted, proposed, noise)
    stable = ((history == argmax[:, None, :]) | ~history_valid[:, :, None]).flatten(1).all(dim=-1)
    if history.shape[1]:
        history = torch.cat([history[:, 1:], argmax[:, None, :]], dim=1)
    mean = entropy.mean(dim=-1)
    stats = torch.stack(
        [
            accepted.sum(dim=-1).to(mean.dtype),
            mean,
            stable.to(mean.dtype),
            (mean < confidence_threshold).to(mean.dtype),
        ],
        dim=1,
    )
    return canvas, argmax, accepted, history, x.to(sc_dtype), stats
