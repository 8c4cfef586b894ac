"""What a model, a context length and a number of slots need in memory, from config.json alone.

The model is built on PyTorch's meta device (shapes, no storage, no weights read), so every parameter is counted
exactly as transformers lays it out, tied weights once. Each part's bytes follow from its dtype, or from the
quantized format's storage (engine/quantization.py decides which weights are quantized; `quantized_bytes` is that
format's layout: data, scales, zero points, kernel padding).

Memory while serving:
- weights, by part (experts, attention, dense MLP, embeddings + tied LM head, vision, the rest);
- each running request's encoder KV cache: every layer's keys and values per token, sliding-window layers capped
  at their window; a batched pass also gathers the rows' caches into one copy padded to the longest row;
- each running request's self-conditioning signal (the previous pass's logits, canvas x vocab in the model dtype);
- the prefix cache: every layer's keys and values of up to prefix_cache_tokens prompt tokens;
- per-pass temporaries, per row: the LM head's output and its soft-capping (model dtype), the fp32 logits, and the
  sampler's fp32 work over canvas x vocab (probabilities, the proposal's Exp(1) draws, entropies);
- a reserve for the runtime (CUDA context, allocator slack): 5% of the device, at least RESERVE_MIN.

Requests are admitted against what remains for KV caches (`KVBudget`), so a long request waits for memory
instead of running the device out of it; `press serve` refuses settings under which one request of
max_model_len cannot fit at all.
"""

from __future__ import annotations

import collections
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.quantization import INT4_CUDA_PAD, group_size, quantizable

GiB = 1024**3
MiB = 1024**2
RESERVE_MIN = 512 * MiB
RESERVE_FRACTION = 0.05
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
# Per-pass temporaries per row, in units of canvas x vocab: the LM head's output and two soft-capping temporaries
# in the model dtype, plus four fp32 arrays (logits, probabilities, Exp(1) draws, their ratio/entropy terms).
PASS_DTYPE_COPIES = 3
PASS_FP32_COPIES = 4

PARTS = ("experts", "attention", "dense MLP", "embeddings", "vision", "self-conditioning", "routers and norms")


def parse_size(text: str) -> int:
    """'24GiB', '18 GB', '512MiB', '1.5G' or a byte count -> bytes (G, GB and GiB all mean 1024^3)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (examples: 24GiB, 18GB, 512MiB)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def part_of(name: str) -> str:
    if ".experts." in name:
        return "experts"
    if "vision" in name:
        return "vision"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    if "self_conditioning" in name:
        return "self-conditioning"
    if ".self_attn." in name and name.endswith("proj.weight"):
        return "attention"
    if ".mlp." in name:
        return "dense MLP"
    return "routers and norms"


def quantized_bytes(method: str, out_features: int, in_features: int, dtype: torch.dtype, device_type: str) -> int:
    """Storage of one (out, in) weight in a quantized format, as torchao lays it out."""
    n, k, d = out_features, in_features, DTYPE_BYTES[dtype]
    if method == "int8":
        return n * k + n * 4 + n  # int8 data, fp32 scale and int8 zero point per output row
    if method == "fp8":
        return n * k + n * 4  # e4m3 data, fp32 scale per row
    if method == "int4":
        g = group_size(k)
        if device_type == "cuda":  # tinygemm tiles: input padded to 1024, output to 8, bf16 scales and zeros
            k, n, d = math.ceil(k / INT4_CUDA_PAD) * INT4_CUDA_PAD, math.ceil(n / 8) * 8, 2
        return n * k // 2 + (k // g) * n * 2 * d  # two int4 per byte, a scale and a zero point per group
    raise ValueError(method)


def _is_quantized_param(name: str) -> bool:
    """Which parameters engine/quantization.py converts: the text stack's projections and experts."""
    text = ".language_model.layers." in name or ".decoder.layers." in name
    projection = (".self_attn." in name or ".mlp." in name) and name.endswith("proj.weight")
    return text and (".experts." in name or projection)


@dataclass
class KVLayer:
    bytes_per_token: int  # keys and values of one token
    window: int | None  # tokens a sliding-window layer keeps (None: all)


@dataclass
class MemoryPlan:
    model: str
    dtype: torch.dtype
    quantization: str
    device_type: str
    canvas_length: int
    vocab_size: int
    context_limit: int  # the model's max_position_embeddings
    parts: dict[str, int] = field(default_factory=dict)  # bytes by part
    params: int = 0
    kv_layers: list[KVLayer] = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(self.parts.values())

    def kv_bytes(self, tokens: int) -> int:
        """One request's encoder cache holding `tokens` positions."""
        return sum(layer.bytes_per_token * min(tokens, layer.window or tokens) for layer in self.kv_layers)

    def kv_bytes_uncapped(self, tokens: int) -> int:
        """Every layer's keys and values of `tokens` positions (the prefix cache keeps sliding layers' too)."""
        return sum(layer.bytes_per_token for layer in self.kv_layers) * tokens

    @property
    def self_conditioning_bytes(self) -> int:
        return self.canvas_length * self.vocab_size * DTYPE_BYTES[self.dtype]

    def pass_bytes(self, rows: int) -> int:
        """Temporaries of one decoder pass and its sampling over `rows` canvases."""
        per_row = self.canvas_length * self.vocab_size * (PASS_DTYPE_COPIES * DTYPE_BYTES[self.dtype]
                                                          + PASS_FP32_COPIES * 4)  # fmt: skip
        return rows * per_row

    def running_bytes(self, lengths: list[int]) -> int:
        """What running requests of these context lengths hold: each its cache and its self-conditioning logits,
        and, when more than one shares a pass, the pass's gathered copy of their caches (every row padded to the
        longest)."""
        if not lengths:
            return 0
        gathered = len(lengths) * self.kv_bytes(max(lengths)) if len(lengths) > 1 else 0
        caches = sum(self.kv_bytes(n) * count for n, count in collections.Counter(lengths).items())
        return caches + gathered + len(lengths) * self.self_conditioning_bytes

    @staticmethod
    def reserve(memory: int) -> int:
        return max(RESERVE_MIN, int(memory * RESERVE_FRACTION))

    def fixed_bytes(self, memory: int, max_num_seqs: int, prefix_cache_tokens: int) -> int:
        """Everything but the running requests' caches: weights, the largest pass, the prefix cache, the reserve."""
        return (self.weights + self.pass_bytes(max_num_seqs) + self.kv_bytes_uncapped(prefix_cache_tokens)
                + self.reserve(memory))  # fmt: skip

    def kv_budget(self, memory: int, max_num_seqs: int, prefix_cache_tokens: int) -> int:
        return memory - self.fixed_bytes(memory, max_num_seqs, prefix_cache_tokens)

    def max_slots(self, memory: int, max_model_len: int, prefix_cache_tokens: int, limit: int = 4096) -> int:
        """Most requests of max_model_len tokens that can run at once (0: not even one)."""
        lo, hi = 0, limit  # more requests need more memory and leave less: monotone, so bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.running_bytes([max_model_len] * mid) <= self.kv_budget(memory, mid, prefix_cache_tokens):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def max_context(self, memory: int, max_num_seqs: int, prefix_cache_tokens: int) -> int:
        """Longest max_model_len at which max_num_seqs requests fit at once (0: none), a multiple of the canvas."""
        budget = self.kv_budget(memory, max_num_seqs, prefix_cache_tokens)
        lo, hi = 0, self.context_limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.running_bytes([mid] * max_num_seqs) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo if lo == self.context_limit else lo - lo % self.canvas_length


def build_plan(config, dtype: torch.dtype, quantization: str = "none", device_type: str = "cuda",
               name: str = "") -> MemoryPlan:  # fmt: skip
    """The plan for a DiffusionGemmaConfig, from shapes alone (the model is built on the meta device)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    text = config.get_text_config()
    plan = MemoryPlan(model=name, dtype=dtype, quantization=quantization, device_type=device_type,
                      canvas_length=config.canvas_length, vocab_size=text.vocab_size,
                      context_limit=text.max_position_embeddings)  # fmt: skip
    plan.parts = dict.fromkeys(PARTS, 0)
    d = DTYPE_BYTES[dtype]
    for pname, p in model.named_parameters():  # tied weights are listed once
        plan.params += p.numel()
        if quantization != "none" and _is_quantized_param(pname):
            shapes = [tuple(p.shape)] if p.dim() == 2 else [tuple(p.shape[1:])] * p.shape[0]
            if all(quantizable(quantization, n, k) for n, k in shapes):
                size = sum(quantized_bytes(quantization, n, k, dtype, device_type) for n, k in shapes)
                plan.parts[part_of(pname)] += size
                continue
        plan.parts[part_of(pname)] += p.numel() * d
    for module_name, module in model.named_modules():  # persistent buffers (per-layer scalars) load too
        for bname, b in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                plan.parts[part_of(f"{module_name}.{bname}")] += b.numel() * d
    window = getattr(text, "sliding_window", None)
    for layer_type, layer in zip(text.layer_types, model.model.encoder.language_model.layers, strict=True):
        kv_width = layer.self_attn.k_proj.out_features  # key heads x head dim; values have the same width
        sliding = layer_type == "sliding_attention" and window
        plan.kv_layers.append(KVLayer(2 * kv_width * d, window - 1 if sliding else None))
    return plan


def load_config(model: str, cache_dir: str | None = None):
    """config.json of a checkpoint directory, a built-in model or a hub id (only that file is fetched)."""
    from transformers import AutoConfig

    from engine.loader import resolve_model_path

    path = resolve_model_path(model, cache_dir)
    if Path(path).is_dir():
        return AutoConfig.from_pretrained(path)
    try:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(path, "config.json")
    except Exception as exc:
        raise ValueError(f"cannot read config.json of {model!r}: not a directory, and the hub said: {exc}") from None
    return AutoConfig.for_model(**json.loads(Path(config_file).read_text()))


def device_memory(device: torch.device) -> int:
    """Memory free for Press on the device now: CUDA's free memory, or the host's available memory on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def describe(plan: MemoryPlan, memory: int | None, max_model_len: int, max_num_seqs: int,
             prefix_cache_tokens: int) -> str:  # fmt: skip
    """The plan as `press plan` prints it, and as `press serve` quotes it when it refuses to start."""
    q = "" if plan.quantization == "none" else f", {plan.quantization} weights"
    lines = [f"{plan.model}: {plan.params / 1e9:.2f}B parameters, {str(plan.dtype).removeprefix('torch.')}{q} "
             f"({plan.device_type} layout)", "", "weights"]  # fmt: skip
    for part in PARTS:
        if plan.parts.get(part):
            lines.append(f"  {part:<20} {fmt(plan.parts[part]):>12}")
    lines.append(f"  {'total':<20} {fmt(plan.weights):>12}  ({plan.weights / 1e9:.2f} GB)")
    full = sum(layer.bytes_per_token for layer in plan.kv_layers if layer.window is None)
    sliding = [layer for layer in plan.kv_layers if layer.window is not None]
    lines += ["", "KV cache (encoder keys and values, per request)",
              f"  per token            {full / 1024:.1f} KiB in {len(plan.kv_layers) - len(sliding)} full-attention "
              f"layers" + (f", {sum(s.bytes_per_token for s in sliding) / 1024:.1f} KiB in {len(sliding)} "
                           f"sliding layers (up to {sliding[0].window} tokens)" if sliding else ""),
              f"  per request at {max_model_len} tokens: {fmt(plan.kv_bytes(max_model_len))}, plus as much again "
              f"while gathered for a batched pass, plus {fmt(plan.self_conditioning_bytes)} self-conditioning",
              f"  prefix cache ({prefix_cache_tokens} tokens): {fmt(plan.kv_bytes_uncapped(prefix_cache_tokens))}",
              "", "per-pass temporaries"]  # fmt: skip
    batches = sorted({1, 2, 4, 8, 16, 32, max_num_seqs} & set(range(1, max(max_num_seqs, 1) + 1)))
    lines.append("  " + ", ".join(f"batch {b}: {fmt(plan.pass_bytes(b))}" for b in batches))
    if memory is None:
        return "\n".join(lines)
    fixed = plan.fixed_bytes(memory, max_num_seqs, prefix_cache_tokens)
    budget = memory - fixed
    lines += ["", f"on {fmt(memory)} (reserve {fmt(plan.reserve(memory))} for the runtime)",
              f"  weights + batch-{max_num_seqs} pass + prefix cache + reserve = {fmt(fixed)}; "
              f"left for requests: {fmt(max(budget, 0))}"]  # fmt: skip
    slots = plan.max_slots(memory, max_model_len, prefix_cache_tokens)
    context = plan.max_context(memory, max_num_seqs, prefix_cache_tokens)
    lines.append(f"  max_model_len {max_model_len}: up to {slots} requests at once (max_num_seqs)")
    lines.append(f"  max_num_seqs {max_num_seqs}: max_model_len up to {context}")
    return "\n".join(lines)


def check_fits(plan: MemoryPlan, memory: int, max_model_len: int, max_num_seqs: int, prefix_cache_tokens: int) -> int:
    """The KV budget under these settings; ValueError with the plan when not even one request of max_model_len
    fits (weights, passes and caches against the device's memory)."""
    budget = plan.kv_budget(memory, max_num_seqs, prefix_cache_tokens)
    if budget < plan.running_bytes([max_model_len]):
        detail = describe(plan, memory, max_model_len, max_num_seqs, prefix_cache_tokens)
        raise ValueError(
            f"these settings do not fit in {fmt(memory)}: one request of max_model_len {max_model_len} needs "
            f"{fmt(plan.running_bytes([max_model_len]))} and {fmt(max(budget, 0))} is left after the weights, the "
            f"batch-{max_num_seqs} pass, the prefix cache and the reserve. Lower max_model_len, max_num_seqs or "
            f"prefix_cache_tokens, or quantize (--quantization int8/int4).\n\n{detail}"
        )
    return budget


class KVBudget:
    """Admission against memory: running requests' caches (each at its longest: prompt + max_tokens), and the
    gathered copy of a batched pass (every row padded to the longest), stay within the budget."""

    def __init__(self, plan: MemoryPlan, budget: int) -> None:
        self.plan = plan
        self.budget = budget

    def fits(self, lengths: list[int]) -> bool:
        return self.plan.running_bytes(lengths) <= self.budget


def measured_parts(model: nn.Module) -> dict[str, int]:
    """Bytes by part of a loaded model's real tensors (quantized ones by their storage) and persistent buffers,
    each tied weight once: what the plan's `parts` predict."""
    parts = dict.fromkeys(PARTS, 0)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            parts[part_of(name)] += tensor_bytes(p)
    for module_name, module in model.named_modules():
        for bname, b in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set and id(b) not in seen:
                seen.add(id(b))
                parts[part_of(f"{module_name}.{bname}")] += tensor_bytes(b)
    return parts


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage of a tensor, counting a torchao subclass's inner tensors."""
    names = getattr(type(t), "tensor_data_names", None)
    if names is None:
        return t.numel() * t.element_size()
    names = list(names) + list(getattr(type(t), "optional_tensor_data_names", []) or [])
    return sum(tensor_bytes(x) for n in names if (x := getattr(t, n, None)) is not None)
