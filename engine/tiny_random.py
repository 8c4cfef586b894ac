"""The built-in `tiny-random` model: a randomly initialised DiffusionGemma small enough for a laptop CPU.

It is written once into a cache directory in Hugging Face layout (config.json, generation_config.json,
model.safetensors, tokenizer) so that it loads through exactly the same path as a real checkpoint.
The tokenizer is a real byte-level BPE (engine/assets/tiny_tokenizer, built by tools/build_tiny_tokenizer.py) that
speaks Gemma 4's chat format, DiffusionGemma's: its control tokens (turns, thinking, tool declarations, calls and
responses, the <|"|> string delimiter) are special tokens, chat_template.jinja renders conversations with tools and
reasoning, and tokenizer_config.json's response_template parses an answer back into content, reasoning and tool calls.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

TINY_RANDOM = "tiny-random"
# Bump when the architecture or seed below changes, so stale caches are not reused.
# v2: full-attention head_dim 64 instead of the config default 512.
# v3: the tokenizer speaks Gemma 4's chat format (its special tokens, chat template, response template; new ids)
#     and the generation config stops on <eos>, <turn|> and <|tool_response>, as DiffusionGemma's does.
# v4: images: a vision tower with 8-pixel patches pooled 2x2 (at most 70 soft tokens per image), bidirectional
#     attention within an image (as larger Gemma 4 models), the image processor's config, image tokens named.
_VERSION = "v4"
_ASSETS = Path(__file__).parent / "assets" / "tiny_tokenizer"

# Token ids of the shipped tokenizer's special tokens (tools/build_tiny_tokenizer.py lists them in this order).
(
    PAD,  # <pad>
    EOS,  # <eos>
    BOS,  # <bos>
    UNK,  # <unk>
    START_OF_TURN,  # <|turn>
    END_OF_TURN,  # <turn|>
    THINK,  # <|think|>
    CHANNEL_START,  # <|channel>
    CHANNEL_END,  # <channel|>
    TOOL_START,  # <|tool>
    TOOL_END,  # <tool|>
    TOOL_CALL_START,  # <|tool_call>
    TOOL_CALL_END,  # <tool_call|>
    TOOL_RESPONSE_START,  # <|tool_response>
    TOOL_RESPONSE_END,  # <tool_response|>
    STRING_DELIM,  # <|"|>
    IMAGE,  # <|image|>
    BOI,  # <|image>
    EOI,  # <image|>
) = range(19)
# What ends an answer, as in DiffusionGemma's generation_config.json ([1, 106, 50] there): <eos>, the end of the
# model's turn, and the start of a tool response (the model stops after its tool calls; the tool's result is
# written by the caller, after which the model continues the same turn).
EOS_TOKEN_IDS = [EOS, END_OF_TURN, TOOL_RESPONSE_START]


# The image side, small: 8x8-pixel patches pooled 2x2, at most 70 soft tokens (280 patches) per image, as the
# processor's smallest budget.
VISION_PATCH = 8
VISION_POOLING = 2
VISION_SOFT_TOKENS = 70


def save_image_processor(path: Path) -> None:
    """The checkpoint's image side as transformers' Gemma 4 processor reads it: preprocessor_config.json (the image
    processor) and processor_config.json (soft tokens per image)."""
    import json

    config = {
        "image_processor_type": "Gemma4ImageProcessor",
        "processor_class": "Gemma4Processor",
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "do_convert_rgb": True,
        "patch_size": VISION_PATCH,
        "max_soft_tokens": VISION_SOFT_TOKENS,
        "pooling_kernel_size": VISION_POOLING,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = {"processor_class": "Gemma4Processor", "image_seq_length": VISION_SOFT_TOKENS}
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


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
        # The encoder attends bidirectionally within each image's soft tokens, so prefill must never cut one.
        "use_bidirectional_attention": "vision",
    }
    vision = {
        "model_type": "gemma4_vision",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "patch_size": VISION_PATCH,
        "pooling_kernel_size": VISION_POOLING,
        "position_embedding_size": 1024,
    }
    return {
        "text_config": text,
        "vision_config": vision,
        "canvas_length": canvas_length,
        "boi_token_id": BOI,
        "eoi_token_id": EOI,
        "image_token_id": IMAGE,
        "pad_token_id": PAD,
        "eos_token_id": [EOS, END_OF_TURN],  # config.json's pair, as DiffusionGemma's; generation adds <|tool_response>
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
        eos_token_id=EOS_TOKEN_IDS,
    )
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(_ASSETS / name, tmp / name)
    save_image_processor(tmp)
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
