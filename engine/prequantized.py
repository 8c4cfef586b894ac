"""Checkpoints published already quantized, in compressed-tensors format (what llm-compressor writes).

The published DiffusionGemma-26B ones (an FP8-dynamic and an INT8 W8A8 checkpoint, by their model cards) store
each MoE layer's experts split, one linear layer per expert (`experts.{e}.gate_proj`, `.up_proj`, `.down_proj`,
each with its `weight_scale`), where transformers' DiffusionGemma keeps them fused (`experts.gate_up_proj`,
`experts.down_proj`) and knows no conversion between the two. Loaded as they are, transformers leaves every
expert at its random initialization with a warning and the other projections as raw quantized numbers: a
model that answers nonsense. Press instead registers the conversion for the load (as transformers ships one for
Qwen2-MoE's split experts), lets transformers dequantize every weight as it loads (compressed-tensors
decompresses them), then quantizes the model again with torchao in the checkpoint's own format
(engine/quantization.py):

- 8-bit float weights -> `fp8`; per-channel ones come back to the same values.
- 8-bit integer weights -> `int8`; but transformers 5.24 cannot dequantize 8-bit integer (int-quantized)
  experts, so such a load is refused with that reason.
- 4-bit integer weights -> `int4` (group-wise with zero points: the 4-bit grid is refitted, so weights move by
  up to a step).

`--quantization` picks another format instead. The full-precision copy lives in host memory while loading.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MODEL_TYPE = "diffusion_gemma"
FORMATS = {("float", 8): "fp8", ("int", 8): "int8", ("int", 4): "int4"}


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def compressed_tensors_config(model_config) -> Any | None:
    """The checkpoint's compressed-tensors quantization config, or None for any other checkpoint."""
    qc = getattr(model_config, "quantization_config", None)
    return qc if qc is not None and _field(qc, "quant_method") == "compressed-tensors" else None


def checkpoint_format(qc) -> str:
    """The Press format matching a compressed-tensors config's weight schemes; ValueError if there is none."""
    groups = _field(qc, "config_groups") or {}
    found = set()
    for group in groups.values():
        weights = _field(group, "weights")
        if weights is None:
            continue
        kind = (str(_field(weights, "type")).split(".")[-1].lower(), _field(weights, "num_bits"))
        if kind not in FORMATS:
            raise ValueError(
                f"compressed-tensors {kind[0]} {kind[1]}-bit weights have no matching Press format (int8, int4, "
                "fp8); choose one with --quantization"
            )
        found.add(FORMATS[kind])
    if len(found) != 1:
        raise ValueError(f"compressed-tensors checkpoint with weight formats {sorted(found) or 'none'}; choose one "
                         "with --quantization")  # fmt: skip
    return found.pop()


def effective_quantization(requested: str, model_config) -> str:
    """The format Press serves a checkpoint in: `requested` (--quantization) when it names one, else a
    compressed-tensors checkpoint's own; other pre-quantized checkpoints load through transformers as they are
    and take no --quantization."""
    qc = getattr(model_config, "quantization_config", None)
    if qc is None:
        return requested
    if compressed_tensors_config(model_config) is None:
        if requested != "none":
            raise ValueError(f"the checkpoint is already quantized ({_field(qc, 'quant_method')}); drop --quantization")
        return requested
    if requested != "none":
        return requested
    try:
        return checkpoint_format(qc)
    except ValueError as exc:
        raise ValueError(f"the checkpoint is quantized with compressed-tensors: {exc}") from None


def _split_experts() -> list:
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    return [
        WeightConverter(
            source_patterns=["experts.*.gate_proj.weight", "experts.*.up_proj.weight"],
            target_patterns="experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="experts.*.down_proj.weight",
            target_patterns="experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


@contextmanager
def loading(model_config) -> Iterator[dict]:
    """Extra `from_pretrained` arguments for this checkpoint, valid inside the block: for a compressed-tensors
    one, dequantize at load, with the split experts' conversion registered for DiffusionGemma meanwhile (and
    what was registered before put back after, so saving a model elsewhere in the process is unaffected); for
    any other checkpoint, none."""
    if compressed_tensors_config(model_config) is None:
        yield {}
        return
    try:
        import compressed_tensors  # noqa: F401
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
        from transformers.utils.quantization_config import CompressedTensorsConfig
    except ImportError as exc:
        raise ValueError(f"loading a compressed-tensors checkpoint needs compressed-tensors and transformers 5.24 "
                         f"or newer: {exc}") from None  # fmt: skip
    import transformers

    previous = get_checkpoint_conversion_mapping(MODEL_TYPE) or []
    register_checkpoint_conversion_mapping(MODEL_TYPE, [*previous, *_split_experts()], overwrite=True)
    try:
        with warnings.catch_warnings():  # transformers warns that it merges this with config.json's: that is the aim
            warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
            yield {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    except RuntimeError as exc:
        if "conversion" not in str(exc):
            raise
        # transformers 5.24 dequantizes FP8 (float-quantized) and packed 4-bit (pack-quantized) experts; 8-bit
        # integer ones (int-quantized) reach its packed path and come back empty.
        fmt = _field(compressed_tensors_config(model_config), "format")
        raise ValueError(
            f"transformers {transformers.__version__} could not dequantize this compressed-tensors checkpoint "
            f"({fmt}) into DiffusionGemma's fused experts (it does float-quantized and pack-quantized ones): {exc}"
        ) from None
    finally:
        register_checkpoint_conversion_mapping(MODEL_TYPE, previous, overwrite=True)


def settle_dtypes(model, dtype) -> None:
    """Parameters left in another dtype by the dequantizing load, in `dtype` as a plain load leaves every one
    (transformers 5.24 hands back packed 4-bit experts in their scales' dtype, float32)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
