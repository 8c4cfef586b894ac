"""Press engine: block-diffusion denoising for DiffusionGemma checkpoints, off the HTTP event loop."""

import logging

# torchao (engine/quantization.py; transformers also imports it when installed) warns at import about optional
# CUDA extensions and Triton kernels that Press does not use.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao registers enums the old way

from engine.config import EngineConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

__all__ = ["EngineConfig", "SamplingParams"]
