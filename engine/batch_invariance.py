"""Batch invariance: a request's numbers do not depend on which other requests share its pass.

Batching the decoder saves weight reads, but two parts of a batched forward would otherwise compute a
row differently than the row alone:

- Attention over left-padded prefixes: a mask changes SDPA's reduction order. Attention has no shared
  weights to save, so a batched pass (a decoder pass, or an encoder pass committing several canvases)
  hands it a `RowPrefix` (each row's padding, and each row's own mask where it has one) instead of a
  padded mask, and it runs row by row on exactly the keys and mask the row would see alone.
- MoE experts: each expert multiplies the tokens routed to it, and a GEMM's per-row result depends on
  how many rows it gets (small-M kernels reduce in another order). The experts here run on blocks of a
  fixed number of tokens (zero-padded), so every token always meets the same GEMM shape.

Dense projections see canvas_length x rows tokens, which is already past the small-M kernels.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "press_rowwise_sdpa"

# Tokens per expert GEMM. Past the small-M kernels on CPU and GPU alike; on CPU, 64 measured ~2 ms faster
# than 16 per batch-8 pass of tiny-random (fewer GEMM calls and concatenations) and no slower at batch 1.
EXPERT_BLOCK = 64


@dataclass(frozen=True)
class RowPrefix:
    """Left padding of each row's cached prefix in a gathered batch (keys before it are filler), and the
    mask each row would get alone (None: none, as for the decoder's bidirectional canvas)."""

    pads: tuple[int, ...]
    masks: tuple[torch.Tensor | None, ...] | None = None


def rowwise_sdpa(module, query, key, value, attention_mask, **kwargs):
    if not isinstance(attention_mask, RowPrefix):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for b, pad in enumerate(attention_mask.pads):
        row_key, row_value = key[b : b + 1, :, pad:].contiguous(), value[b : b + 1, :, pad:].contiguous()
        row_mask = attention_mask.masks[b] if attention_mask.masks else None
        out, _ = sdpa_attention_forward(module, query[b : b + 1].contiguous(), row_key, row_value, row_mask, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=0), None


AttentionInterface.register(ATTENTION, rowwise_sdpa)


def _blocked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T computed on zero-padded blocks of exactly EXPERT_BLOCK rows."""
    block = EXPERT_BLOCK
    n = x.shape[0]
    padded = -(-n // block) * block
    if padded != n:
        x = torch.cat([x, x.new_zeros((padded - n, x.shape[1]))])
    out = torch.cat([nn.functional.linear(x[s : s + block], weight) for s in range(0, padded, block)])
    return out[:n]


def expert_loop(self, hidden_states, top_k_index, top_k_weights, linear=nn.functional.linear):
    """transformers' DiffusionGemma expert loop (same math, same expert order) with the GEMM given as `linear`;
    an expert's weights come from `expert_weights(idx)` where the module has it (engine/quantization.py's
    per-expert layers), else from its fused 3D tensors."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        if hasattr(self, "expert_weights"):
            gate_up_w, down_w = self.expert_weights(int(expert_idx))
        else:
            gate_up_w, down_w = self.gate_up_proj[expert_idx], self.down_proj[expert_idx]
        gate, up = linear(hidden_states[token_idx], gate_up_w).chunk(2, dim=-1)
        out = linear(self.act_fn(gate) * up, down_w)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def blocked_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The expert loop with fixed-shape GEMMs."""
    return expert_loop(self, hidden_states, top_k_index, top_k_weights, _blocked_linear)


def install(model) -> None:
    """Route decoder and encoder attention through `rowwise_sdpa` (plain SDPA for anything but a
    `RowPrefix`, so single-row passes are untouched) and give the experts fixed-shape GEMMs. Leaves the
    attention alone when a kernel other than SDPA was chosen explicitly."""
    for layers in (model.model.decoder.layers, model.model.encoder.language_model.layers):
        if layers and layers[0].self_attn.config._attn_implementation in ("sdpa", ATTENTION):
            config = copy.copy(layers[0].self_attn.config)
            config._attn_implementation = ATTENTION
            for layer in layers:
                layer.self_attn.config = config
    # Encoder and decoder share the expert weights; patch every expert module (quantized ones too).
    for module in model.modules():
        if type(module).__name__ in ("DiffusionGemmaTextExperts", "QuantizedExperts"):
            module.forward = types.MethodType(blocked_experts_forward, module)
