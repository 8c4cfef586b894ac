"""The built-in `tiny-random` model: a randomly initialised DiffusionGemma small enough for a laptop CPU.

It is written once into a cache directory in Hugging Face layout (config.json, generation_config.json,
model.safetensors, tokenizer) so that it loads through exactly the same path as a real checkpoint.
The tokenizer is a real byte-level BPE (engine/assets/tiny_tokenizer) with a Gemma-style chat template.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

TINY_RANDOM = "tiny-random"
# Bump when the architecture or seed below changes, so stale caches are not reused.
_VERSION = "v2"  # v2: full-attention head_dim 64 instead of the config default 512
_ASSETS = Path(__file__).parent / "assets" / "tiny_tokenizer"

# Token ids of the shipped tokenizer's special tokens.
PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN, IMAGE, BOI, EOI = range(9)


def tiny_config_kwargs(canvas_length: int = 32, vocab_size: int = 1024, num_layers: int = 4) -> dict:
    """Config for a DiffusionGemma with every architectural feature of the full model, at toy size:
    sliding and full attention layers, MoE experts beside the dense MLP, tiny vision tower."""
    layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        # transformers defaults the full-attention layers to head_dim 512; at this size that one layer would
        # cost more per token than the three others together. Twice the sliding head_dim, as in the 26B model.
        "global_head_dim": 64,
        "max_position_embeddings": 4096,
        "sliding_window": 64,
        "layer_types": layer_types,
        "enable_moe_block": True,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 32,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "bos_token_id": BOS,
    }
    vision = {
        "model_type": "gemma4_vision",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    return {
        "text_config": text,
        "vision_config": vision,
        "canvas_length": canvas_length,
        "boi_token_id": BOI,
        "eoi_token_id": EOI,
        "image_token_id": IMAGE,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "bos_token_id": BOS,
    }


def build_tiny_model(seed: int = 0, **config_kwargs):
    """A freshly initialised tiny DiffusionGemmaForBlockDiffusion (fp32, eval mode)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config = DiffusionGemmaConfig(**tiny_config_kwargs(**config_kwargs))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config)
    return model.eval()


def default_cache_dir() -> Path:
    root = os.environ.get("PRESS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "press"
    )
    return Path(root)


def save_checkpoint(model, path: Path, max_denoising_steps: int = 48) -> None:
    """Write model, generation config and the shipped tokenizer in Hugging Face layout."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_new_tokens=256,
        max_denoising_steps=max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=[EOS, END_OF_TURN],
    )
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(_ASSETS / name, tmp / name)
    # Atomic publish: concurrent first uses (tests, several servers) never see a half-written model.
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_random(cache_dir: str | Path | None = None) -> Path:
    """Path of the tiny-random checkpoint, creating it on first use."""
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / f"tiny-random-{_VERSION}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(build_tiny_model(), path)
    return path
