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
- 8-bit integer weights -> `int8` (torchao's per-channel scales differ from the checkpoint's by a hair, so
  weights may move by a step). transformers 5.24 hands back int-quantized experts empty, so Press multiplies
  their weights by their (per-channel or per-tensor, symmetric) scales itself.
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
    try:
        if _field(qc, "format") == "int-quantized":  # whatever it is served as, Press dequantizes its experts
            _check_int_scales(qc)
        return requested if requested != "none" else checkpoint_format(qc)
    except ValueError as exc:
        raise ValueError(f"the checkpoint is quantized with compressed-tensors: {exc}") from None


def _scaled_experts():
    """A load op for unpacked experts: each expert's quantized `weight` times its `weight_scale` (per output
    channel or per tensor, symmetric), stacked per projection for the merge that follows."""
    import torch
    from transformers.core_model_loading import ConversionOps

    class ScaledExperts(ConversionOps):
        def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, **kwargs):
            dtype = kwargs["model"].get_parameter(full_layer_name).dtype
            out = {}
            for key, weights in input_dict.items():
                if key.endswith("_scale"):
                    continue
                scales = input_dict[f"{key}_scale"]
                weights = weights if isinstance(weights, list) else [weights]
                scales = scales if isinstance(scales, list) else [scales]
                out[key] = torch.stack(
                    [(w.float() * s.float()).to(dtype) for w, s in zip(weights, scales, strict=True)]
                )
            return out

    return ScaledExperts()


def _split_experts(own_scales: bool) -> list:
    """Converters fusing split experts into DiffusionGemma's `experts.gate_up_proj` (gate rows, then up rows) and
    `experts.down_proj`. transformers' quantizer puts its own dequantize op before these ops, which does FP8
    and packed 4-bit experts; int-quantized ones it hands back empty, so with `own_scales` Press's op multiplies
    each `weight` by its `weight_scale` first, and listing the scales among the sources keeps the quantizer
    from wrapping those converters."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    def sources(*projections: str) -> list[str]:
        names = ("weight", "weight_scale") if own_scales else ("weight",)
        return [f"experts.*.{p}.{n}" for p in projections for n in names]

    first = [_scaled_experts()] if own_scales else []
    return [
        WeightConverter(
            source_patterns=sources("gate_proj", "up_proj"),
            target_patterns="experts.gate_up_proj",
            operations=[*first, MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns=sources("down_proj"),
            target_patterns="experts.down_proj",
            operations=[*first, MergeModulelist(dim=0)],
        ),
    ]


def _check_int_scales(qc) -> None:
    """ValueError unless every int-quantized weight scheme has symmetric per-channel or per-tensor scales (the
    ones Press's op multiplies out: no zero points, no groups)."""
    for group in (_field(qc, "config_groups") or {}).values():
        weights = _field(group, "weights")
        if weights is None:
            continue
        strategy = str(_field(weights, "strategy")).split(".")[-1].lower()
        symmetric = bool(_field(weights, "symmetric"))
        if strategy not in ("channel", "tensor") or not symmetric:
            raise ValueError(
                f"compressed-tensors int-quantized weights with {'' if symmetric else 'asymmetric '}{strategy} "
                "scales are not supported (symmetric per-channel or per-tensor ones are)"
            )


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

    qc = compressed_tensors_config(model_config)
    own_scales = _field(qc, "format") == "int-quantized"  # its scales checked by effective_quantization
    previous = get_checkpoint_conversion_mapping(MODEL_TYPE) or []
    register_checkpoint_conversion_mapping(MODEL_TYPE, [*previous, *_split_experts(own_scales)], overwrite=True)
    try:
        with warnings.catch_warnings():  # transformers warns that it merges this with config.json's: that is the aim
            warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
            yield {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    except RuntimeError as exc:
        if "conversion" not in str(exc):
            raise
        raise ValueError(
            f"transformers {transformers.__version__} could not convert this compressed-tensors checkpoint "
            f"({_field(qc, 'format')}) into DiffusionGemma's weights: {exc}"
        ) from None
    finally:
        register_checkpoint_conversion_mapping(MODEL_TYPE, previous, overwrite=True)


def settle_dtypes(model, dtype) -> None:
    """Parameters left in another dtype by the dequantizing load, in `dtype` as a plain load leaves every one
    (transformers 5.24 hands back packed 4-bit experts in their scales' dtype, float32)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
