"""Time one denoising pass at batch 1, 2, 4, 8: Press's engine against transformers' generate().

Both run on the same weights in the same process. transformers runs first, on the stock model; then the
engine takes the model (installing its batch-invariant kernels unless --no-batch-invariant). Random
weights never get confident, so every canvas runs all its passes and pass time = canvas time / passes.

    python bench/engine.py --size tiny            # CPU, the built-in tiny-random model
    python bench/engine.py --size full            # GPU: full-size random DiffusionGemma-26B-A4B (bf16)

Prints a markdown table and writes JSON + the table to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

# This file is bench/engine.py: drop bench/ from the import path so `engine` is the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.host_allocator import tune_host_allocator  # noqa: E402
from engine.loader import wrap_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

FULL_TEXT = dict(
    vocab_size=262144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    sliding_window=1024,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    max_position_embeddings=262144,
    global_head_dim=512,
    num_global_key_value_heads=2,
    enable_moe_block=True,
)
VISION = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB, process-wide high-water mark


def build(size: str, dev: torch.device):
    from transformers import AutoTokenizer, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from engine.tiny_random import _ASSETS, build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(_ASSETS)
    if size == "tiny":
        return build_tiny_model().to(dev), tokenizer, 64, 32
    cfg = DiffusionGemmaConfig(text_config=FULL_TEXT, vision_config=VISION, canvas_length=256)
    torch.manual_seed(0)
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        model = DiffusionGemmaForBlockDiffusion(cfg).eval()
        torch.set_default_dtype(torch.float32)
    return model, tokenizer, 512, 256


def time_hf(model, batch: int, prompt_len: int, canvas: int, steps: int, dev: torch.device, repeats: int) -> float:
    """Best of `repeats` timed runs (after a warm-up) of one canvas at this batch size."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(10, vocab, (batch, prompt_len), device=dev)
    kw = dict(max_new_tokens=canvas, max_denoising_steps=steps, stability_threshold=1, confidence_threshold=1e-9)
    model.generate(ids, **kw)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        model.generate(ids, **kw)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def time_engine(
    engine: LLMEngine, batch: int, prompt_len: int, canvas: int, steps: int, dev: torch.device, repeats: int
) -> float:
    """Best of `repeats` timed canvases (after a warm-up), measured like time_hf."""
    params = SamplingParams(
        max_tokens=canvas, denoising_steps=steps, confidence_threshold=1e-9, eos_token_ids=[], include_drafts=False
    )

    def one_canvas() -> float:
        g = torch.Generator().manual_seed(batch)
        states = [
            engine.make_request(
                torch.randint(10, engine.vocab_size, (prompt_len,), generator=g).tolist(), params.with_changes(seed=i)
            )
            for i in range(batch)
        ]
        for s in states:
            engine.add_request(s)
        sync(dev)
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step(lambda *_: None)
        sync(dev)
        return time.perf_counter() - t

    one_canvas()  # warm-up
    return min(one_canvas() for _ in range(repeats))


def invariance_rate(engine: LLMEngine, batch: int, prompt_len: int, canvas: int, steps: int) -> dict:
    """Each of `batch` seeded requests (different prompt lengths and sampling parameters) alone, then all
    together: the share of requests, and of tokens, that come out identical."""
    g = torch.Generator().manual_seed(1234)
    requests = []
    for i in range(batch):
        n = max(1, prompt_len - 37 * i)
        params = SamplingParams(
            max_tokens=canvas,
            denoising_steps=max(2, steps - 5 * i),
            entropy_bound=(0.1, 1.0, 5.0)[i % 3],
            t_min=0.2 + 0.05 * i,
            t_max=0.8,
            confidence_threshold=1e-9,
            eos_token_ids=[],
            include_drafts=False,
            seed=100 + i,
        )
        requests.append((torch.randint(10, engine.vocab_size, (n,), generator=g).tolist(), params))

    def run(group: list) -> list[list[int]]:
        states = [engine.make_request(p, sp) for p, sp in group]
        for s in states:
            engine.add_request(s)
        while engine.has_unfinished():
            engine.step(lambda *_: None)
        return [s.answer_ids for s in states]

    alone = [run([r])[0] for r in requests]
    together = run(requests)
    same_tokens = sum(a == b for x, y in zip(alone, together, strict=True) for a, b in zip(x, y, strict=True))
    return {
        "requests": batch,
        "identical_requests": sum(x == y for x, y in zip(alone, together, strict=True)) / batch,
        "identical_tokens": same_tokens / sum(len(x) for x in alone),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=48, help="passes per canvas")
    ap.add_argument("--no-batch-invariant", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch size; the best is reported")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    # As `press serve` does, and before anything runs: transformers and Press then time under the same
    # allocator settings, whichever goes first.
    tune_host_allocator()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, prompt_len, canvas = build(args.size, dev)
    batches = [int(b) for b in args.batches.split(",")]
    hf = {b: time_hf(model, b, prompt_len, canvas, args.steps, dev, args.repeats) for b in batches}
    engine = LLMEngine(
        EngineConfig(max_num_seqs=max(batches), batch_invariant=not args.no_batch_invariant),
        loaded=wrap_model(model, tokenizer),
    )
    rows = []
    for b in batches:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        ours = time_engine(engine, b, prompt_len, canvas, args.steps, dev, args.repeats)
        rows.append(
            {
                "batch": b,
                "hf_pass_ms": hf[b] / args.steps * 1e3,
                "press_pass_ms": ours / args.steps * 1e3,
                "hf_canvas_tokens_per_s": b * canvas / hf[b],
                "press_canvas_tokens_per_s": b * canvas / ours,
                "peak_memory_gb": peak_gb(dev),
            }
        )
    invariance = invariance_rate(engine, max(batches), prompt_len, canvas, args.steps)
    base = rows[0]["press_pass_ms"]
    lines = [
        f"Engine pass time, {args.size} model, prompt {prompt_len}, canvas {canvas}, {args.steps} passes per canvas, "
        f"batch-invariant {'off' if args.no_batch_invariant else 'on'}, best of {args.repeats} — {device_name(dev)}, "
        f"torch {torch.__version__}",
        "",
        "| batch | transformers pass ms | Press pass ms | Press / transformers | Press pass vs batch 1 "
        "| transformers canvas tok/s | Press canvas tok/s | peak memory GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['hf_pass_ms']:.1f} | {r['press_pass_ms']:.1f} | "
            f"{r['press_pass_ms'] / r['hf_pass_ms']:.2f} | {r['press_pass_ms'] / base:.2f}x | "
            f"{r['hf_canvas_tokens_per_s']:.0f} | {r['press_canvas_tokens_per_s']:.0f} | {r['peak_memory_gb']:.2f} |"
        )
    lines += [
        "",
        f"Batch invariance ({invariance['requests']} seeded requests alone vs together): "
        f"{invariance['identical_requests']:.0%} of requests and {invariance['identical_tokens']:.2%} of tokens "
        "identical.",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"engine-{args.size}-{dev.type}"
    (out / f"{tag}.json").write_text(
        json.dumps(
            {
                "device": device_name(dev),
                "size": args.size,
                "steps": args.steps,
                "repeats": args.repeats,
                "prompt_len": prompt_len,
                "canvas": canvas,
                "rows": rows,
                "batch_invariant": not args.no_batch_invariant,
                "invariance": invariance,
            },
            indent=1,
        )
    )
    (out / f"{tag}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
