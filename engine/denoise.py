"""The denoising math of one pass, as pure tensor functions on a single canvas row.

Each function mirrors one named step of DiffusionGemma's sampler: the temperature schedule, proposing a
denoised canvas, accepting the lowest-entropy positions under an entropy bound, renoising the rest, and the
stable-and-confident stop rule. All randomness comes from the caller's `torch.Generator`, drawn in the same
order and shapes as transformers' reference loop, so a seed reproduces the reference exactly.

Shapes: `logits` is (canvas_length, vocab) for one row; canvases are (canvas_length,) int64.
"""

from __future__ import annotations

import torch

# Positions per chunk when computing entropies: bounds the fp32 temporaries to chunk x vocab instead of
# canvas x vocab (each Categorical-style entropy needs log-probs, probs and their product).
ENTROPY_CHUNK = 32


def pass_temperature(steps_remaining: int, denoising_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Linear schedule, hot first: t = t_min + (t_max - t_min) * k / N with k counting down from N to 1.

    Computed as a float32 tensor exactly as the reference does, because an ulp of difference in the
    temperature can flip a sampled token.
    """
    k = torch.tensor(steps_remaining, dtype=torch.int32)
    return t_min + (t_max - t_min) * (k / denoising_steps)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, in nats, computed in position chunks."""
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_out = out.view(-1)
    min_real = torch.finfo(logits.dtype).min
    for start in range(0, flat_logits.shape[0], ENTROPY_CHUNK):
        chunk = flat_logits[start : start + ENTROPY_CHUNK]
        log_probs = chunk - chunk.logsumexp(dim=-1, keepdim=True)
        probs = torch.softmax(log_probs, dim=-1)
        flat_out[start : start + ENTROPY_CHUNK] = -(log_probs.clamp(min=min_real) * probs).sum(-1)
    return out


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask tokens outside the smallest set whose probability mass reaches top_p (per position)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def propose_canvas(logits: torch.Tensor, greedy: bool, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per position from the (temperature-scaled) logits: the denoiser's canvas.

    Works in position chunks so that no second canvas x vocab fp32 tensor is ever alive. Sampling is
    the exponential race torch.multinomial itself uses for one sample (argmax of p / q, q ~ Exp(1)); on
    CPU the chunked draws consume the generator exactly like one multinomial call over the whole canvas.
    """
    if greedy:
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[:-1], dtype=torch.long, device=logits.device)
    for start in range(0, logits.shape[0], ENTROPY_CHUNK):
        chunk = nucleus_filter(logits[start : start + ENTROPY_CHUNK], top_p)
        probs = torch.softmax(chunk, dim=-1, dtype=torch.float32)
        race = exponential_draws(probs.shape, generator, probs.device)
        out[start : start + ENTROPY_CHUNK] = probs.div_(race).argmax(dim=-1)
    return out


def exponential_draws(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Exp(1) draws in float32, exactly the numbers `torch.empty(shape).exponential_(1, generator=generator)` makes.

    On CPU that kernel draws one float64 uniform u per element and returns -log1p(-u), element by element
    (~25 ns each, a third of a tiny model's pass). Drawing the uniforms in one call and transforming them as a
    tensor consumes the generator identically and gives identical numbers about 2.5x faster (checked against
    the kernel itself by tests/test_denoise.py). Other devices keep the kernel.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(shape, device=device).exponential_(1, generator=generator)
    return exponential_from_uniform_(torch.empty(shape, dtype=torch.float64).uniform_(generator=generator)).float()


def exponential_from_uniform_(uniform: torch.Tensor) -> torch.Tensor:
    """The CPU exponential kernel's transform of its float64 uniforms u, -log1p(-u), in place."""
    return uniform.neg_().log1p_().neg_()


def accept_mask(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """Accept the k lowest-entropy positions with sum(entropy_1..k) - max(entropy_1..k) <= entropy_bound.

    The left side bounds the joint mutual information of the accepted tokens, so they are close to
    independent and can be committed together. The lowest-entropy position is always accepted.
    """
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    # Sorted ascending, so the running maximum is the current element.
    keep_sorted = sorted_entropy.cumsum(dim=-1) - sorted_entropy <= entropy_bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def random_canvas(
    length: int, vocab_size: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """A canvas of uniformly random token ids: uniform-noise diffusion has no mask token."""
    return torch.randint(0, vocab_size, (1, length), generator=generator, device=device)[0]


def renoise(
    current: torch.Tensor,
    proposed: torch.Tensor,
    accepted: torch.Tensor,
    vocab_size: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Keep accepted positions from the proposal, earlier tokens elsewhere, then renoise what was not accepted.

    The intermediate `where` mirrors the reference; non-accepted positions are overwritten by noise anyway.
    """
    accepted_canvas = torch.where(accepted, proposed, current)
    noise = random_canvas(current.shape[-1], vocab_size, generator, current.device)
    return torch.where(~accepted, noise, accepted_canvas)


def stable_flag(history: torch.Tensor, argmax_canvas: torch.Tensor) -> torch.Tensor:
    """True (a 0-d bool tensor, no host sync) when the argmax canvas equals each of the last `len(history)`
    argmax canvases.

    `history` is (stability_threshold, canvas_length), filled with -1 before any pass; with a threshold of
    0 it is empty and the canvas counts as stable.
    """
    return (history == argmax_canvas[None, :]).all()


def push_history(history: torch.Tensor, argmax_canvas: torch.Tensor) -> torch.Tensor:
    if history.shape[0] == 0:
        return history
    return torch.cat([history[1:], argmax_canvas[None, :]], dim=0)


def confident_flags(mean_entropy: torch.Tensor, confidence_threshold: torch.Tensor) -> torch.Tensor:
    """True where a canvas's mean entropy is under its threshold (element-wise over rows)."""
    return mean_entropy < confidence_threshold


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of `token_ids` under softmax(logits) per position, and the `top` most probable tokens
    with theirs, computed in position chunks. Returns (chosen (n,), top_ids (n, top), top_logprobs (n, top))."""
    n = token_ids.shape[0]
    chosen = torch.empty(n, dtype=torch.float32, device=logits.device)
    top_ids = torch.empty((n, top), dtype=torch.long, device=logits.device)
    top_lp = torch.empty((n, top), dtype=torch.float32, device=logits.device)
    for start in range(0, n, ENTROPY_CHUNK):
        stop = min(n, start + ENTROPY_CHUNK)
        log_probs = torch.log_softmax(logits[start:stop].float(), dim=-1)
        chosen[start:stop] = log_probs.gather(-1, token_ids[start:stop, None])[:, 0]
        if top:
            values, ids = log_probs.topk(top, dim=-1)
            _chosen_first_among_equals(ids, values, token_ids[start:stop], chosen[start:stop])
            top_ids[start:stop], top_lp[start:stop] = ids, values
    return chosen, top_ids, top_lp


def _chosen_first_among_equals(ids: torch.Tensor, values: torch.Tensor, tokens: torch.Tensor, chosen: torch.Tensor):
    """topk orders equal log-probabilities in no particular order (not argmax's lowest-id-first), and ties are
    common in bf16 logits: where the chosen token is as probable as a listed one, it goes first among its equals
    (and into the list if a tie cut it off), so a committed argmax is always the first alternative. In place."""
    top = ids.shape[1]
    slot = (values > chosen[:, None]).sum(-1)  # where the chosen token belongs: after every strictly better one
    listed = slot < top
    wrong = listed & (ids.gather(1, slot.clamp_max(top - 1)[:, None])[:, 0] != tokens)
    for r in wrong.nonzero()[:, 0].tolist():
        t, c, j = int(tokens[r]), float(chosen[r]), int(slot[r])
        rest = [(i, v) for i, v in zip(ids[r].tolist(), values[r].tolist(), strict=True) if i != t]
        rest.insert(j, (t, c))
        ids[r] = torch.tensor([i for i, _ in rest[:top]], dtype=ids.dtype)
        values[r] = torch.tensor([v for _, v in rest[:top]], dtype=values.dtype)
