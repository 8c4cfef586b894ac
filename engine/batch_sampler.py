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
    """One pass's random inputs for a batch: the Exp(1) race of every position and token and the ids that renoise
    rejected positions. On CPU the race is held as the float64 uniforms u the CPU kernel draws (Exp(1) =
    -log1p(-u), which the graph computes, fused into the proposal); greedy rows draw nothing for their proposal,
    so their race is whatever the buffer holds and goes unused."""

    race: torch.Tensor  # (rows, canvas, vocab): float64 uniforms on CPU, float32 Exp(1) draws elsewhere
    noise: torch.Tensor  # (rows, canvas) int64

    @classmethod
    def empty(cls, rows: int, canvas: int, vocab_size: int, device: torch.device) -> Draws:
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        return cls(
            race=torch.full((rows, canvas, vocab_size), 0.5, dtype=dtype, device=device),
            noise=torch.zeros((rows, canvas), dtype=torch.long, device=device),
        )


def draw(draws: Draws, generators: list[torch.Generator | None], greedy: list[bool], vocab_size: int) -> Draws:
    """Fill `draws` row by row from each row's own generator, in the eager sampler's order (the same numbers as
    `denoise.exponential_draws`); rows past `len(generators)` (batch padding) keep whatever they hold."""
    canvas = draws.noise.shape[1]
    device = draws.noise.device
    for i, (generator, is_greedy) in enumerate(zip(generators, greedy, strict=True)):
        if not is_greedy:
            if draws.race.dtype == torch.float64:
                draws.race[i].uniform_(generator=generator)
            else:
                draws.race[i].exponential_(1, generator=generator)
        draws.noise[i] = denoise.random_canvas(canvas, vocab_size, generator, device)
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
    (rows,) bool; race and noise from `draw` (`Draws`); history (rows, S, canvas) int64, the last S argmax canvases,
    and history_valid (rows, S) bool, which of them a row's own stability threshold looks at (the last ones).

    Returns the renoised canvases, the argmax canvases, the accepted masks, the pushed histories, the processed
    logits (kept for self-conditioning, in `sc_dtype`) and per row (accepted count, mean entropy, stable,
    confident) as fp32.
    """
    if race.dtype == torch.float64:  # CPU uniforms: the Exp(1) race as the CPU kernel makes it
        race = race.neg().log1p().neg().float()
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
