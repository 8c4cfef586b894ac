"""Automatic prefix caching: time to first draft with a 2,000-token shared prefix, cold against cached.

Each trial sends a request whose prompt is a 2,000-token prefix (a long system prompt, an earlier turn) plus a
short new part, through the engine alone (no HTTP): cold on an engine with the prefix cache off, and warm on
an engine that has seen the prefix once; with batch-invariant kernels (exact restores, up to the last chunk end
among the cached blocks) and with stock kernels (every cached block restored). Time to first draft is arrival
to the first refinement pass, what a streaming client waits before the first `draft` chunk. Median of the
trials, one run, same machine.

    python bench/prefix_cache.py [--size tiny|full]     # writes bench/results/prefix-cache-<size>-<device>.{json,md}
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.events import PassEvent  # noqa: E402
from engine.host_allocator import tune_host_allocator  # noqa: E402
from engine.tiny_random import ensure_tiny_random  # noqa: E402


def first_draft_seconds(engine: LLMEngine, prompt: list[int]) -> float:
    params = engine.defaults.with_changes(max_tokens=engine.canvas_length, denoising_steps=2, seed=0)
    state = engine.make_request(prompt, params)
    seen: list[float] = []
    start = time.perf_counter()
    engine.add_request(state)
    while not seen:
        engine.step(lambda s, e: seen.append(time.perf_counter()) if isinstance(e, PassEvent) else None)
    state.cancelled.set()
    while engine.has_unfinished():
        engine.step(lambda s, e: None)
    return seen[0] - start


# Restores: batch invariance (the CPU default) restores only up to where a cold prefill's chunk ends, so a warm
# prompt is encoded bit for bit as a cold one; stock kernels (compiled, CUDA's default) restore every cached block.
MODES = {"batch-invariant": True, "stock": False}


def hits(engine: LLMEngine) -> float:
    return engine.metrics.registry.get_sample_value(
        "press:prefix_cache_hits_total", {"model_name": str(engine.config.model)}
    )


def measure(model: str, batch_invariant: bool, prefix: list[int], trials: int, chunk: int, rng) -> dict:
    """Median time to first draft, cold and warm, of `trials` prompts = prefix + 20 new tokens, in one mode."""
    kw = dict(model=model, prefill_chunk=chunk, batch_invariant=batch_invariant)
    cold = LLMEngine(EngineConfig(prefix_cache_tokens=0, **kw))
    warm = LLMEngine(EngineConfig(prefix_cache_tokens=16384, **kw))
    first_draft_seconds(warm, prefix)  # the prefix is now cached
    for engine in (cold, warm):  # warm both engines' kernels up
        first_draft_seconds(engine, [5, 6, 7])
    cold_t, warm_t, restored = [], [], 0
    for _trial in range(trials):
        tail = [rng.randrange(20, 1000) for _ in range(20)]
        cold_t.append(first_draft_seconds(cold, prefix + tail))
        before = hits(warm)
        warm_t.append(first_draft_seconds(warm, prefix + tail))
        restored = hits(warm) - before
    result = {"cold_first_draft_ms": 1000 * statistics.median(cold_t),
              "warm_first_draft_ms": 1000 * statistics.median(warm_t), "restored_tokens": int(restored)}  # fmt: skip
    result["warm_over_cold"] = result["warm_first_draft_ms"] / result["cold_first_draft_ms"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny"], help="the built-in random model")
    ap.add_argument("--prefix", type=int, default=2000)
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk, help="the engines' chunk")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_host_allocator()
    model = str(ensure_tiny_random())
    rng = random.Random(0)
    prefix = [rng.randrange(20, 1000) for _ in range(args.prefix)]
    modes = {name: measure(model, inv, prefix, args.trials, args.prefill_chunk, rng) for name, inv in MODES.items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"model": "tiny-random", "device": device, "threads": torch.get_num_threads(),
              "prefix_tokens": args.prefix, "new_tokens": 20, "trials": args.trials,
              "prefill_chunk": args.prefill_chunk, "modes": modes}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"prefix-cache-{args.size}-{device}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = (
        f"tiny-random, {device}, {result['threads']} threads; prompt = {args.prefix}-token shared prefix + 20 new "
        f"tokens; prefill_chunk {args.prefill_chunk}; median of {args.trials}.\n\n"
        "| kernels | cold (prefix cache off) | prefix cached | restored tokens | cached / cold |\n"
        "|---|---|---|---|---|\n"
    )
    table += "".join(
        f"| {m} | {r['cold_first_draft_ms']:.1f} ms | {r['warm_first_draft_ms']:.1f} ms | {r['restored_tokens']} | "
        f"{r['warm_over_cold']:.3f} |\n"
        for m, r in modes.items()
    )
    (out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
