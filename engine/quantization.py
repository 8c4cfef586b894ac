"""Weight-only quantization applied at load (`--quantization int8|int4|fp8`), through torchao.

What is quantized: every projection of the text decoder stack (attention q/k/v/o, the dense MLP) and the MoE
experts, which hold about nine tenths of DiffusionGemma's weights. transformers stores each layer's experts as
two fused 3D tensors; here they become one linear layer per expert (`QuantizedExperts`), which torchao quantizes
like any other, run by the same expert loop as transformers' (and by the batch-invariant fixed-block loop when
that is on). Encoder and decoder share their weights, so each quantized weight is built once and shared too.

What stays in the model's dtype: embeddings and the tied LM head, norms, routers (their softmax picks the
experts), the self-conditioning MLP (it reads the previous pass's logits) and the vision tower. A projection
whose input width is not a multiple of 32 (int4's smallest group) or whose output is not a multiple of 32 also
stays unquantized; `QuantizationReport` lists what was and was not converted.

Formats (torchao tensor subclasses; group sizes are the largest of 128, 64, 32 dividing a layer's input width):
- int8: symmetric per-output-channel int8 weights (`Int8WeightOnlyConfig`), any device.
- int4: asymmetric group-wise int4 weights with bf16/fp32 scales and zero points: on CPU torchao's opaque
  tinygemm layout (`_weight_int4pack_mm_for_cpu`), on CUDA (compute capability 8.0+) the tinygemm tile layout,
  which needs bf16 activations and pads the input width to a multiple of 1024.
- fp8: float8_e4m3 weights with per-row scales; on CUDA (compute capability 8.9+: Ada, Hopper, Blackwell)
  activations are quantized per row too and the matmul runs in fp8; on CPU the weights are dequantized per
  matmul (weight-only), which halves their memory but is slower.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.batch_invariance import expert_loop

log = logging.getLogger("press.engine")

METHODS = ("none", "int8", "int4", "fp8")
GROUP_SIZES = (128, 64, 32)
INT4_CUDA_PAD = 1024  # tinygemm pads the input width to this multiple


def group_size(in_features: int) -> int | None:
    """int4's group: the largest supported size dividing the input width (None: none does)."""
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def quantizable(method: str, out_features: int, in_features: int) -> bool:
    """Whether a (out, in) weight can take this format (kernel shape constraints)."""
    if method == "int4":
        return group_size(in_features) is not None and out_features % 32 == 0
    if method == "fp8":
        return in_features % 16 == 0 and out_features % 16 == 0
    return True


def check_name(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")


def check_method(method: str, device: torch.device) -> None:
    """Refuse a format the device cannot run, before anything is loaded."""
    check_name(method)
    if device.type == "cuda" and method in ("int4", "fp8"):
        major, minor = torch.cuda.get_device_capability(device)
        need = (8, 0) if method == "int4" else (8, 9)
        if (major, minor) < need:
            raise ValueError(
                f"quantization {method} needs a GPU of compute capability {need[0]}.{need[1]} or newer; "
                f"this one is {major}.{minor} (int8 runs anywhere)"
            )
    elif device.type not in ("cpu", "cuda") and method != "none":
        raise ValueError(f"quantization {method} is supported on cpu and cuda, not {device.type}")


def _torchao_config(method: str, in_features: int, device: torch.device):
    from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

    keep = {"set_inductor_config": False}  # leave torch.compile's global settings to engine/compiled.py
    if method == "int8":
        return Int8WeightOnlyConfig(**keep)
    if method == "int4":
        if device.type == "cuda":
            return Int4WeightOnlyConfig(group_size=group_size(in_features), int4_packing_format="tile_packed_to_4d",
                                        **keep)  # fmt: skip
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size(in_features), **keep)
    if device.type == "cuda":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **keep)
    return Float8WeightOnlyConfig(**keep)


def quantize_linear(linear: nn.Linear, method: str, device: torch.device) -> nn.Linear:
    """The layer with its weight quantized on `device` (moved there first: a weight is quantized where it runs)."""
    from torchao.quantization import quantize_

    linear.to(device)
    quantize_(linear, _torchao_config(method, linear.in_features, device))
    return linear


class QuantizedExperts(nn.Module):
    """A layer's MoE experts as one linear layer per expert (gate and up fused, then down), run by transformers'
    expert loop (batch_invariance.expert_loop; its fixed-block version when batch invariance is on)."""

    def __init__(self, gate_up: nn.ModuleList, down: nn.ModuleList, act_fn) -> None:
        super().__init__()
        self.num_experts = len(gate_up)
        self.gate_up = gate_up
        self.down = down
        self.act_fn = act_fn

    def expert_weights(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[idx].weight, self.down[idx].weight

    # Compiled passes (engine/compiled.py) run this loop eagerly between their graphs: which experts a pass hits
    # is data, and transformers' compile-friendly implementations index the fused 3D tensors this replaces.
    @torch.compiler.disable
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return expert_loop(self, hidden_states, top_k_index, top_k_weights)


@dataclass
class QuantizationReport:
    method: str
    quantized: list[str] = field(default_factory=list)  # module names (first owner of a shared weight)
    skipped: list[str] = field(default_factory=list)  # quantizable kinds whose shape the kernels refuse

    def summary(self) -> str:
        return f"{self.method}: {len(self.quantized)} projections quantized" + (
            f", {len(self.skipped)} left unquantized (shape): {', '.join(self.skipped[:4])}" if self.skipped else ""
        )


def _expert_linears(weights: torch.Tensor, method: str, device: torch.device) -> nn.ModuleList:
    """One quantized nn.Linear per expert from a fused (experts, out, in) tensor."""
    layers = nn.ModuleList()
    for e in range(weights.shape[0]):
        linear = nn.Linear(weights.shape[2], weights.shape[1], bias=False, device="meta")
        linear.weight = nn.Parameter(weights[e].detach().clone(), requires_grad=False)
        layers.append(quantize_linear(linear, method, device))
    return layers


def _targets(model) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """What to quantize, grouped by weight: id of the weight -> [(name, parent module, attribute)]. Encoder and
    decoder layers are distinct modules holding the same parameters, so a group usually has two owners; the
    ids are taken while every weight is alive."""
    groups: dict[int, list[tuple[str, nn.Module, str]]] = {}
    inner = model.model
    for stack_name, layers in (("encoder", inner.encoder.language_model.layers), ("decoder", inner.decoder.layers)):
        for i, layer in enumerate(layers):
            experts = getattr(layer, "experts", None)
            if experts is not None and hasattr(experts, "gate_up_proj"):
                groups.setdefault(id(experts.gate_up_proj), []).append((f"{stack_name}.layers.{i}.experts", layer,
                                                                        "experts"))  # fmt: skip
            for parent_name in ("self_attn", "mlp"):
                parent = getattr(layer, parent_name, None)
                for name, child in parent.named_children() if parent is not None else ():
                    if isinstance(child, nn.Linear):
                        where = f"{stack_name}.layers.{i}.{parent_name}.{name}"
                        groups.setdefault(id(child.weight), []).append((where, parent, name))
    return groups


def _quantized(module: nn.Module, method: str, device: torch.device) -> nn.Module | None:
    """The module's quantized replacement, or None where the kernels refuse its shapes."""
    if isinstance(module, nn.Linear):
        return quantize_linear(module, method, device) if quantizable(method, *module.weight.shape) else None
    gate_up, down = module.gate_up_proj, module.down_proj
    if not all(quantizable(method, w.shape[1], w.shape[2]) for w in (gate_up, down)):
        return None
    return QuantizedExperts(
        _expert_linears(gate_up, method, device), _expert_linears(down, method, device), module.act_fn
    )


def quantize_model(model, method: str, device: torch.device) -> QuantizationReport:
    """Quantize the text stack's projections and experts in place, each weight moved to `device` as it is
    quantized (so a model loaded on the CPU never has to fit the GPU in full precision); the caller moves the
    rest of the model to `device` afterwards."""
    report = QuantizationReport(method)
    if method == "none":
        return report
    check_method(method, device)
    for owners in _targets(model).values():
        where, parent, attr = owners[0]
        new = _quantized(getattr(parent, attr), method, device)
        if new is None:
            report.skipped.append(where)
            continue
        report.quantized.append(where)
        for _, parent, attr in owners:
            setattr(parent, attr, new)
    log.info("quantization %s", report.summary())
    return report
