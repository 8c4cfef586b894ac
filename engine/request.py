"""One request's denoising state: its cache, the canvas being refined, and what has been committed."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.constraints import CanvasConstraints
from engine.detokenizer import TextStream
from engine.grammar import GrammarConstraint
from engine.images import PromptImages
from engine.sampling_params import SamplingParams

_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for a slot
    PREFILLING = "prefilling"  # holds a slot; prompt being encoded chunk by chunk
    DENOISING = "denoising"  # a canvas is being refined pass by pass
    FINISHED = "finished"


@dataclass
class DenoiseState:
    """Mutable per-request state. Only the engine thread touches it, except `cancelled`."""

    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    status: RequestStatus = RequestStatus.WAITING
    generator: torch.Generator | None = None
    cache: object | None = None  # the encoder KV cache (transformers Cache), prompt + committed canvases
    cached_len: int = 0  # positions held in the cache
    prefix_hit: int = 0  # prompt positions restored from the prefix cache
    canvas_index: int = 0
    pass_index: int = 0  # passes done on the current canvas
    canvas: torch.Tensor | None = None  # current noisy canvas (canvas_length,)
    argmax_canvas: torch.Tensor | None = None
    self_conditioning: torch.Tensor | None = None  # previous pass's processed logits, (L, V)
    history: torch.Tensor | None = None  # last argmax canvases for the stability rule
    grammar: GrammarConstraint | None = None  # structured output: the grammar the canvases are read under
    constraints: CanvasConstraints | None = None  # fixed tokens (infill) and initial canvases (predictions)
    images: PromptImages | None = None  # the prompt's images, read by the encoder at prefill
    # Templates with holes: summed log-probabilities of the template's tokens at the passes that committed its
    # canvases (holes as filled; fixed tokens as the model scored them before they were pinned), and their count.
    template_logprob: float = 0.0
    template_tokens: int = 0
    fixed_logprob: tuple[float, int] = (0.0, 0)  # the latest pass's fixed-token score
    accepted_prediction_tokens: int = 0
    # Rows with params.verify: summed verification log-probabilities of the answer's tokens, and their count.
    verified_logprob: float = 0.0
    verified_tokens: int = 0
    fixed_answer_tokens: int = 0  # answer tokens a template fixed (the rest the model wrote)
    answer_ids: list[int] = field(default_factory=list)  # committed answer tokens (cut at EOS/stop/length)
    denoised_tokens: int = 0  # committed canvas tokens up to EOS, excluding pad, for tokens_per_forward
    total_passes: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    # With n > 1 choices share one prompt: only the first bills it (usage and the prompt-token counter).
    bills_prompt: bool = True
    finish_reason: str | None = None

    @property
    def cache_keys(self) -> list:
        """The prompt as the prefix cache identifies it (image tokens stand for their images)."""
        return self.images.cache_keys(self.prompt_ids) if self.images is not None else self.prompt_ids

    @property
    def max_canvases(self) -> int:
        return -(-self.params.max_tokens // self.canvas_length)

    canvas_length: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.denoised_tokens / self.total_passes if self.total_passes else 0.0
