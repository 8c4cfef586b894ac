"""Engine configuration: which model, where it runs, and the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass, field


def _default_model() -> str:
    from engine.loader import default_model

    return default_model()


@dataclass
class EngineConfig:
    # A checkpoint directory, a hub id, or a built-in name: tiny-sudoku (trained, shipped) or tiny-random.
    model: str = field(default_factory=_default_model)
    # "auto": bf16 on CUDA, fp32 on CPU.
    dtype: str = "auto"
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    # Context length the server enforces (prompt + max_tokens); None takes the model's own.
    max_model_len: int | None = None
    # Upper bound on answer tokens when a request does not set max_tokens.
    default_max_tokens: int = 1024
    # Requests denoising at the same time (rows of one batched pass); the rest wait in the queue.
    max_num_seqs: int = 8
    # Requests allowed to wait for a slot; beyond it the server answers 503 with Retry-After.
    max_queue: int = 256
    # Same tokens for a seeded request alone or in any batch (row-wise attention, fixed-shape expert GEMMs);
    # None: on unless passes are compiled (compiled passes use stock kernels).
    batch_invariant: bool | None = None
    # Compiled static-shape passes (engine/compiled.py), compiled per batch bucket at startup; None: on for CUDA,
    # off on CPU.
    compile: bool | None = None
    # Prompt tokens encoded per engine step (chunked prefill), shared by all prefilling requests.
    prefill_chunk: int = 512
    # Encoder keys and values of prompt prefixes kept for reuse across requests (automatic prefix caching),
    # in tokens; 0 turns it off.
    prefix_cache_tokens: int = 16384
    # Where built-in models (tiny-random) are materialised in Hugging Face layout.
    cache_dir: str | None = None
    # Name the API reports; None uses the model argument.
    served_model_name: str | None = None
    # Weight-only quantization applied at load (engine/quantization.py): none, int8, int4 or fp8.
    quantization: str = "none"
    # Memory Press may use on the device ("24GiB", "18GB"; host RAM on CPU); None: the device's free memory at
    # startup. Settings that cannot fit are refused before the weights load; requests are admitted against what
    # is left for KV caches (engine/memory_plan.py).
    gpu_memory: str | None = None
    # Interop/intra-op threads for torch on CPU; None leaves torch's default.
    torch_threads: int | None = None
