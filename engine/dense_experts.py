"""Dense MoE experts inside compiled passes, for models with few experts per routed one.

transformers runs a MoE layer's experts through `grouped_mm`, which under `torch.compile` in fp32 (and on a CPU
whose torch lacks the kernel) becomes an opaque per-expert loop: one small GEMM per expert, its routing
computed on the host side of the graph, nothing fused. When a model has few experts for each one a token uses
(`num_experts / top_k <= MAX_RATIO`), running every token through every expert as two batched matmuls and
weighting the outputs by a dense routing matrix (zero for the experts a token did not pick) costs at most that
ratio in arithmetic and gives inductor one static-shape graph to fuse. The result is the routed sum up to the
order of the additions (a zero weight contributes exactly zero).

Only traced code takes the dense path: outside a compiled graph (the eager encoder, the reference engine) the
experts run exactly as before. Models with many experts per routed one (DiffusionGemma-26B-A4B: 128 experts,
top 8) keep `grouped_mm`, where the dense product would multiply the work sixteenfold.
"""

from __future__ import annotations

import types

import torch

MAX_RATIO = 4
_EXPERTS = ("DiffusionGemmaTextExperts",)


def worthwhile(text_config) -> bool:
    """Whether dense experts cost at most MAX_RATIO times the routed ones for this model."""
    experts = getattr(text_config, "num_experts", None)
    top_k = getattr(text_config, "top_k_experts", None)
    if not getattr(text_config, "enable_moe_block", bool(experts)) or not experts or not top_k:
        return False
    return experts / top_k <= MAX_RATIO


def dense_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Every token through every expert; `experts` holds gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""
    gate, up = torch.einsum("th,eoh->eto", hidden_states, experts.gate_up_proj).chunk(2, dim=-1)
    out = torch.einsum("eti,ehi->eth", experts.act_fn(gate) * up, experts.down_proj)
    routing = torch.zeros(
        (hidden_states.shape[0], experts.num_experts), dtype=out.dtype, device=hidden_states.device
    ).scatter(1, top_k_index, top_k_weights.to(out.dtype))
    return torch.einsum("eth,te->th", out, routing).to(hidden_states.dtype)


def install(model: torch.nn.Module) -> int:
    """Give the model's experts the dense path for traced calls; returns how many experts modules took it
    (none when the model has too many experts per routed one)."""
    if not worthwhile(model.config.get_text_config()):
        return 0
    count = 0
    for module in model.modules():
        if type(module).__name__ not in _EXPERTS or getattr(module, "_press_dense", False):
            continue
        eager = module.forward

        def forward(self, hidden_states, top_k_index, top_k_weights, _eager=eager):
            if torch.compiler.is_compiling():
                return dense_forward(self, hidden_states, top_k_index, top_k_weights)
            return _eager(hidden_states, top_k_index, top_k_weights)

        module.forward = types.MethodType(forward, module)
        module._press_dense = True
        count += 1
    return count
