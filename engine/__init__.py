"""Press engine: block-diffusion denoising for DiffusionGemma checkpoints, off the HTTP event loop."""

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams

__all__ = ["EngineConfig", "SamplingParams"]
