"""Load a DiffusionGemma checkpoint (local directory, hub id or built-in name) through transformers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerBase

from engine import prequantized, quantization
from engine.config import EngineConfig
from engine.memory_plan import MemoryPlan, build_plan, check_fits, device_memory, fmt, parse_size
from engine.sampling_params import SamplingParams
from engine.tiny_random import TINY_RANDOM, ensure_tiny_random

log = logging.getLogger("press.engine")


@dataclass
class LoadedModel:
    model: DiffusionGemmaForBlockDiffusion
    tokenizer: PreTrainedTokenizerBase
    path: str
    device: torch.device
    dtype: torch.dtype
    canvas_length: int
    vocab_size: int
    max_model_len: int
    defaults: SamplingParams  # the checkpoint's generation_config.json over transformers' defaults
    quantization: str = "none"
    kv_budget: int | None = None  # bytes left for running requests' caches (engine/memory_plan.py); None: unbounded
    plan: MemoryPlan | None = None


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device, quantization: str = "none") -> torch.dtype:
    """ "auto": bf16 on CUDA, and with int4 weights anywhere (int4 kernels take bf16 activations; on CPU with fp32
    ones torchao falls back to a path ~90x slower), else fp32."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" or quantization == "int4" else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if spec not in dtypes:
        raise ValueError(f"unknown dtype {spec!r}; choose one of auto, {', '.join(dtypes)}")
    return dtypes[spec]


# Models the project trains and ships (models/<name>/ in the repository, /app/models/<name>/ in the image).
SHIPPED_MODELS_DIR = Path(os.environ.get("PRESS_SHIPPED_MODELS") or Path(__file__).resolve().parents[1] / "models")
TINY_SUDOKU = "tiny-sudoku"


def default_model() -> str:
    """The trained tiny-sudoku where it ships, else the generated tiny-random."""
    return TINY_SUDOKU if (SHIPPED_MODELS_DIR / TINY_SUDOKU / "config.json").exists() else TINY_RANDOM


def resolve_model_path(model: str, cache_dir: str | None) -> str:
    if model == TINY_RANDOM:
        return str(ensure_tiny_random(cache_dir))
    if model == TINY_SUDOKU:
        return str(SHIPPED_MODELS_DIR / TINY_SUDOKU)
    return str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model


def checkpoint_defaults(model: DiffusionGemmaForBlockDiffusion, tokenizer: PreTrainedTokenizerBase) -> SamplingParams:
    gc = model.generation_config
    sampler = getattr(gc, "sampler_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = model.config.text_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    base = SamplingParams()
    return SamplingParams(
        max_tokens=getattr(gc, "max_new_tokens", None) or base.max_tokens,
        denoising_steps=getattr(gc, "max_denoising_steps", None) or base.denoising_steps,
        entropy_bound=getattr(sampler, "entropy_bound", None) or base.entropy_bound,
        t_min=gc.t_min if getattr(gc, "t_min", None) is not None else base.t_min,
        t_max=gc.t_max if getattr(gc, "t_max", None) is not None else base.t_max,
        stability_threshold=(
            gc.stability_threshold if getattr(gc, "stability_threshold", None) is not None
            else base.stability_threshold
        ),
        confidence_threshold=getattr(gc, "confidence_threshold", None) or base.confidence_threshold,
        eos_token_ids=eos_ids,
    )  # fmt: skip


def wrap_model(
    model: DiffusionGemmaForBlockDiffusion, tokenizer: PreTrainedTokenizerBase, max_model_len: int | None = None
) -> LoadedModel:
    """A LoadedModel around a model already in memory (benchmarks build full-size random models this way)."""
    text_config = model.config.get_text_config()
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        path="<in-memory>",
        device=model.device,
        dtype=model.dtype,
        canvas_length=model.config.canvas_length,
        vocab_size=text_config.vocab_size,
        max_model_len=max_model_len or text_config.max_position_embeddings,
        defaults=checkpoint_defaults(model, tokenizer),
    )


def settings_plan(config: EngineConfig, model_config, device: torch.device) -> MemoryPlan:
    """The memory plan of these settings for a model's config: the weights' format (--quantization, or a
    compressed-tensors checkpoint's own: engine/prequantized.py) and the activations' dtype fixed, nothing checked
    against the device (`press plan` plans for a device it may not have)."""
    method = prequantized.effective_quantization(config.quantization, model_config)
    quantization.check_name(method)
    dtype = resolve_dtype(config.dtype, device, method)
    return build_plan(model_config, dtype, method, device.type, name=config.model)


def plan_memory(
    config: EngineConfig, model_config, device: torch.device, report: bool = True
) -> tuple[MemoryPlan, int]:
    """The memory plan of these settings and the KV budget they leave; ValueError (with the plan's arithmetic)
    when the device cannot run the weights' format or they cannot fit it, before any weight is read. `report`:
    log the plan (the loader does; `press serve`'s check before loading does not, so it is logged once)."""
    plan = settings_plan(config, model_config, device)
    quantization.check_method(plan.quantization, device)
    if plan.quantization == "int4" and device.type == "cuda" and plan.dtype != torch.bfloat16:
        raise ValueError("int4 on CUDA runs tinygemm kernels, which need --dtype bfloat16")
    memory = parse_size(config.gpu_memory) if config.gpu_memory else device_memory(device)
    max_len = model_config.get_text_config().max_position_embeddings
    max_len = min(max_len, config.max_model_len) if config.max_model_len is not None else max_len
    budget = check_fits(plan, memory, max_len, config.max_num_seqs, config.prefix_cache_tokens)
    slots = plan.max_slots(memory, max_len, config.prefix_cache_tokens)
    if not report:
        return plan, budget
    log.info("memory plan: %s weights, %s left for request caches on %s (%d requests of %d tokens at once)",
             fmt(plan.weights), fmt(budget), fmt(memory), slots, max_len)  # fmt: skip
    if slots < config.max_num_seqs:
        log.warning("at max_model_len %d only %d of max_num_seqs %d requests fit at once; longer requests wait "
                    "for memory (press plan shows the arithmetic)", max_len, slots, config.max_num_seqs)  # fmt: skip
    return plan, budget


def load_model(config: EngineConfig) -> LoadedModel:
    device = resolve_device(config.device)
    path = resolve_model_path(config.model, config.cache_dir)
    model_config = AutoConfig.from_pretrained(path)
    plan, budget = plan_memory(config, model_config, device)
    dtype, method = plan.dtype, plan.quantization
    log.info("loading %s on %s (%s%s)", path, device, dtype,
             f", {method} weights" if method != "none" else "")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(path)
    with prequantized.loading(model_config) as extra:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype, **extra)
    if extra:
        prequantized.settle_dtypes(model, dtype)
    quantization.quantize_model(model, method, device)
    model = model.to(device).eval()
    text_config = model.config.get_text_config()
    max_len = text_config.max_position_embeddings
    if config.max_model_len is not None:
        max_len = min(max_len, config.max_model_len)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=path,
        device=device,
        dtype=dtype,
        canvas_length=model.config.canvas_length,
        vocab_size=text_config.vocab_size,
        max_model_len=max_len,
        defaults=checkpoint_defaults(model, tokenizer),
        quantization=method,
        kv_budget=budget,
        plan=plan,
    )
