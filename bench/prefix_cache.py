"""Automatic prefix caching: time to first draft with a 2,000-token shared prefix, cold against cached.

Each trial sends a request whose prompt is a 2,000-token prefix (a long system prompt, an earlier turn) plus a
short new part, through the engine alone (no HTTP): cold on an engine with the prefix cache off, and warm on
an engine that has seen the prefix once. Time to first draft is arrival to the first refinement pass, what a
streaming client waits before the first `draft` chunk. Median of the trials, one run, same machine.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny"], help="the built-in random model")
    ap.add_argument("--prefix", type=int, default=2000)
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_host_allocator()
    model = str(ensure_tiny_random())
    cold = LLMEngine(EngineConfig(model=model, prefix_cache_tokens=0))
    warm = LLMEngine(EngineConfig(model=model, prefix_cache_tokens=16384))
    rng = random.Random(0)
    prefix = [rng.randrange(20, 1000) for _ in range(args.prefix)]
    first_draft_seconds(warm, prefix)  # the prefix is now cached
    for engine in (cold, warm):  # warm both engines' kernels up
        first_draft_seconds(engine, [5, 6, 7])
    cold_t, warm_t = [], []
    for _trial in range(args.trials):
        tail = [rng.randrange(20, 1000) for _ in range(20)]
        cold_t.append(first_draft_seconds(cold, prefix + tail))
        warm_t.append(first_draft_seconds(warm, prefix + tail))
    device = cold.loaded.device.type
    result = {
        "model": "tiny-random",
        "device": device,
        "threads": torch.get_num_threads(),
        "prefix_tokens": args.prefix,
        "new_tokens": 20,
        "trials": args.trials,
        "cold_first_draft_ms": 1000 * statistics.median(cold_t),
        "warm_first_draft_ms": 1000 * statistics.median(warm_t),
    }
    result["warm_over_cold"] = result["warm_first_draft_ms"] / result["cold_first_draft_ms"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"prefix-cache-{args.size}-{device}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = (
        f"tiny-random, {device}, {result['threads']} threads; prompt = {args.prefix}-token shared prefix + 20 new "
        f"tokens; median of {args.trials}.\n\n| | time to first draft |\n|---|---|\n"
        f"| cold (prefix cache off) | {result['cold_first_draft_ms']:.1f} ms |\n"
        f"| prefix cached | {result['warm_first_draft_ms']:.1f} ms |\n"
        f"| cached / cold | {result['warm_over_cold']:.3f} |\n"
    )
    (out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
