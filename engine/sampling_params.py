"""Per-request sampling parameters: the denoising schedule, acceptance and stop rules, length and stops."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# transformers' DiffusionGemmaGenerationConfig defaults; a checkpoint's generation_config.json overrides them.
DEFAULT_DENOISING_STEPS = 48
DEFAULT_ENTROPY_BOUND = 0.1
DEFAULT_T_MIN = 0.4
DEFAULT_T_MAX = 0.8
DEFAULT_STABILITY_THRESHOLD = 1
DEFAULT_CONFIDENCE_THRESHOLD = 0.005

# OpenAI's reasoning_effort mapped onto the denoising budget: more passes and a tighter entropy bound
# accept fewer positions per pass, so each accepted token is conditioned on more settled neighbours.
REASONING_EFFORT_PRESETS: dict[str, dict[str, float | int]] = {
    "low": {"denoising_steps": 24, "entropy_bound": 0.2},
    "medium": {"denoising_steps": 48, "entropy_bound": 0.1},
    "high": {"denoising_steps": 48, "entropy_bound": 0.1},
}
# ... and onto candidate answers per choice, denoised side by side, the best kept (the server's `best_of`, ranked by
# verification passes: engine/verify.py). High spends its budget on candidates, not passes: on tiny-sudoku 96
# passes and a 0.05 bound solved no more than 24 passes, while the best of 64 answers solved 72% / 97% of 26-31 /
# 32-40-given validation puzzles against 22% / 65% for one answer (the best of 32: 62% / 94%).
REASONING_EFFORT_BEST_OF: dict[str, int] = {"low": 1, "medium": 1, "high": 64}
# Verification passes per best_of candidate, each hiding every 9th canvas token (engine/verify.py): ranked that way,
# 64 tiny-sudoku candidates solved 97% of 32-40-given validation puzzles against 94% by one pass that hides nothing.
BEST_OF_VERIFY_PASSES = 9


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
MAX_VERIFY_PASSES = 64


class SamplingParamsError(ValueError):
    """A parameter value the engine cannot run; `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """Everything that shapes one request's denoising, resolved to concrete values.

    `max_tokens` counts answer tokens; an answer spans ceil(max_tokens / canvas_length) canvases at most.
    `t_max` under GREEDY_BELOW means greedy: the denoiser proposes the argmax token and no sampling noise is
    drawn beyond the initial canvas and renoising. (Dividing logits by a temperature that small overflows or,
    in float32, by zero; vLLM draws the same line.)
    """

    max_tokens: int = 256
    denoising_steps: int = DEFAULT_DENOISING_STEPS
    entropy_bound: float = DEFAULT_ENTROPY_BOUND
    t_min: float = DEFAULT_T_MIN
    t_max: float = DEFAULT_T_MAX
    stability_threshold: int = DEFAULT_STABILITY_THRESHOLD
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    include_drafts: bool = True
    # Log-probabilities of the committed tokens with this many alternatives each (None: none at all).
    logprobs: int | None = None
    # As vLLM's: False keeps special tokens in the answer text (a chat format's markers, for its parser).
    skip_special_tokens: bool = True
    # Score each committed canvas by this many more decoder passes over it (engine/verify.py): best_of's ranking.
    # 0: none; 1: the canvas as its own input; K > 1: K passes, each hiding every K-th position behind noise.
    verify: int = 0

    @property
    def greedy(self) -> bool:
        return self.t_max < GREEDY_BELOW

    def with_changes(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise SamplingParamsError naming the first field that is out of range."""
        checks: list[tuple[str, bool, str]] = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("denoising_steps", 1 <= self.denoising_steps <= 1024, "must be between 1 and 1024"),
            ("entropy_bound", self.entropy_bound > 0, "must be greater than 0"),
            ("t_min", self.t_min >= 0, "must be at least 0"),
            ("t_max", self.t_max >= 0, "must be at least 0"),
            ("t_min", self.t_min <= self.t_max, "must not exceed t_max (temperature)"),
            ("t_max", self.t_max <= 10, "must be at most 10"),
            ("stability_threshold", 0 <= self.stability_threshold <= 1024, "must be between 0 and 1024"),
            ("confidence_threshold", self.confidence_threshold > 0, "must be greater than 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("stop", len(self.stop) <= 16, "at most 16 stop sequences"),
            ("stop", all(0 < len(s) <= 256 for s in self.stop), "stop sequences must be 1-256 characters"),
            ("verify", 0 <= self.verify <= MAX_VERIFY_PASSES, f"must be 0-{MAX_VERIFY_PASSES}"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"must be 0-{MAX_LOGPROBS}"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise SamplingParamsError(param, f"`{param}` {message}")
