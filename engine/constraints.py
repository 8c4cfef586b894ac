"""Canvas constraints of one row: tokens fixed at answer positions (infill templates, fill-in-the-middle) and
the tokens canvases start from instead of uniform noise (predicted outputs).

Positions are answer positions: canvas `c` covers positions [c * L, (c + 1) * L) for a canvas length L, so a
template longer than one canvas continues on the next one. The sampler consults a row's constraints on every
pass: a fixed position's logits become one-hot on its token (zero entropy, proposed and argmax'd as that token,
always accepted, never renoised, and seen that way by the decoder through the canvas and self-conditioning).
A row without constraints is not touched at all, so the reference algorithm is unchanged.

A template's free positions are *holes* of up to N tokens: a model leaves a hole shorter by writing filler
there (its pad or EOS tokens), and fillers written inside a hole are dropped from the answer. The answer ends
where the template ends: the position right after it is fixed to EOS when it falls in the same canvas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine import denoise

Segment = list[int] | int  # fixed token ids, or a hole of up to that many free positions


@dataclass
class CanvasConstraints:
    fixed: dict[int, int] = field(default_factory=dict)  # answer position -> token id
    holes: frozenset[int] = frozenset()  # free positions of a template, where fillers are dropped
    fillers: frozenset[int] = frozenset()  # token ids that leave a hole shorter (pad, EOS)
    end: int | None = None  # a template's length: the answer ends there
    initial: list[int] = field(default_factory=list)  # tokens the canvases start from, by answer position
    predicted: int = 0  # how many of `initial` are a prediction's tokens (an EOS may follow them)
    _cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)

    # ----------------------------------------------------------- construction

    @classmethod
    def template(cls, segments: list[Segment], eos_token_id: int | None, fillers: set[int]) -> CanvasConstraints:
        """Fixed segments and holes laid out from answer position 0; EOS pinned right after the template."""
        fixed: dict[int, int] = {}
        holes: set[int] = set()
        pos = 0
        for seg in segments:
            if isinstance(seg, int):
                holes.update(range(pos, pos + seg))
                pos += seg
            else:
                fixed.update((pos + i, t) for i, t in enumerate(seg))
                pos += len(seg)
        if eos_token_id is not None:
            fixed[pos] = eos_token_id  # only used while the template's last canvas is being denoised
        return cls(fixed=fixed, holes=frozenset(holes), fillers=frozenset(fillers), end=pos)

    @classmethod
    def prediction(cls, tokens: list[int], eos_token_id: int | None) -> CanvasConstraints:
        """Canvases start from the predicted tokens (then EOS) instead of noise; nothing is fixed."""
        return cls(initial=list(tokens) + ([eos_token_id] if eos_token_id is not None else []), predicted=len(tokens))

    # -------------------------------------------------------------- per canvas

    def _canvas_fixed(self, canvas_index: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = (canvas_index, length)
        if key not in self._cache:
            lo = canvas_index * length
            items = sorted((p - lo, t) for p, t in self.fixed.items() if lo <= p < lo + length)
            self._cache[key] = (
                (
                    torch.tensor([p for p, _ in items], dtype=torch.long, device=device),
                    torch.tensor([t for _, t in items], dtype=torch.long, device=device),
                )
                if items
                else None
            )
        return self._cache[key]

    def fixed_positions(self, canvas_index: int, length: int) -> list[int]:
        """Positions of canvas `canvas_index` that are fixed (canvas-relative), for drafts."""
        lo = canvas_index * length
        return sorted(p - lo for p in self.fixed if lo <= p < lo + length)

    def start_canvas(self, canvas: torch.Tensor, canvas_index: int) -> torch.Tensor:
        """The canvas a pass sequence starts from: the noise the caller drew, with predicted and fixed tokens
        written over it."""
        length = canvas.shape[0]
        lo = canvas_index * length
        initial = self.initial[lo : lo + length]
        if initial:
            canvas = canvas.clone()
            canvas[: len(initial)] = torch.tensor(initial, dtype=canvas.dtype, device=canvas.device)
        fixed = self._canvas_fixed(canvas_index, length, canvas.device)
        if fixed is not None:
            canvas = canvas.clone()
            canvas[fixed[0]] = fixed[1]
        return canvas

    def mask_logits(self, logits: torch.Tensor, canvas_index: int) -> None:
        """Fixed positions' logits become one-hot on their token (0 there, -inf elsewhere), in place."""
        fixed = self._canvas_fixed(canvas_index, logits.shape[0], logits.device)
        if fixed is None:
            return
        positions, tokens = fixed
        logits[positions] = float("-inf")
        logits[positions, tokens] = 0.0

    def fixed_logprob(self, logits: torch.Tensor, canvas_index: int) -> tuple[float, int]:
        """Sum and count of the fixed tokens' log-probabilities under `logits` before they are masked: how well
        the model expects the template's text around its holes (a hole of the wrong length misplaces it)."""
        fixed = self._canvas_fixed(canvas_index, logits.shape[0], logits.device)
        if fixed is None:
            return 0.0, 0
        chosen, _, _ = denoise.token_logprobs(logits[fixed[0]], fixed[1], 0)
        return float(chosen.sum()), int(fixed[0].shape[0])

    def force_accept_(self, accepted: torch.Tensor, canvas_index: int) -> None:
        """Fixed positions count as accepted, in place."""
        fixed = self._canvas_fixed(canvas_index, accepted.shape[0], accepted.device)
        if fixed is not None:
            accepted[fixed[0]] = True

    # ------------------------------------------------------------------ answer

    def answer_positions(self, canvas_index: int, canvas_ids: list[int]) -> tuple[list[int], bool]:
        """Canvas positions that make the answer (fillers in holes dropped, cut where the template ends), and
        whether the template ends in this canvas."""
        lo = canvas_index * len(canvas_ids)
        stop = len(canvas_ids) if self.end is None else max(0, min(len(canvas_ids), self.end - lo))
        keep = [i for i in range(stop) if not (lo + i in self.holes and canvas_ids[i] in self.fillers)]
        return keep, self.end is not None and self.end <= lo + len(canvas_ids)

    def hole_logprob(self, logits: torch.Tensor, canvas_index: int, canvas_ids: list[int]) -> tuple[float, int]:
        """Sum and count of the log-probabilities, under `logits`, of the tokens committed in this canvas's holes."""
        lo = canvas_index * len(canvas_ids)
        positions = [i for i in range(len(canvas_ids)) if lo + i in self.holes]
        if not positions:
            return 0.0, 0
        index = torch.tensor(positions, dtype=torch.long, device=logits.device)
        ids = torch.tensor([canvas_ids[p] for p in positions], dtype=torch.long, device=logits.device)
        chosen, _, _ = denoise.token_logprobs(logits[index], ids, 0)
        return float(chosen.sum()), len(positions)

    def accepted_prediction(self, canvas_index: int, length: int, positions: list[int], tokens: list[int]) -> int:
        """Predicted tokens the committed answer kept at their positions (EOS after the prediction not counted)."""
        lo = canvas_index * length
        n = self.predicted
        return sum(1 for p, t in zip(positions, tokens, strict=True) if lo + p < n and self.initial[lo + p] == t)
