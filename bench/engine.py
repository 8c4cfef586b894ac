"""Time one denoising pass at batch 1, 2, 4, 8: Press's engine against transformers' generate().

Both run on the same weights in the same process. transformers runs first, on the stock model; then the
engine with stock kernels; then the engine with compiled passes (engine/compiled.py; its startup compile is
timed); then the engine with its batch-invariant kernels (installed into the model), each with its
batch-invariance rate (--kernels picks modes). With --interleave, transformers and the stock and compiled
engines take turns instead, canvas by canvas and across batch sizes, so their ratios (batch 8 against batch 1
too) see the same load on a shared machine. Random
weights never get confident, so every canvas runs all its passes and pass time = canvas time / passes.

    python bench/engine.py --size tiny            # CPU, the built-in tiny-random model
    python bench/engine.py --size full            # GPU: full-size random DiffusionGemma-26B-A4B (bf16)
    python bench/engine.py --size tiny --kernels stock,compiled --interleave   # a shared CPU

Prints a markdown table and writes JSON + the table to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Hashable
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

# google/diffusiongemma-26B-A4B-it's architecture (text stack as published; transformers' default Gemma 4 vision
# tower), as `press plan` reads it.
FULL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "models" / "diffusiongemma-26b-a4b-it"


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
    cfg = DiffusionGemmaConfig.from_pretrained(FULL_CONFIG)
    torch.manual_seed(0)
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        model = DiffusionGemmaForBlockDiffusion(cfg).eval()
        torch.set_default_dtype(torch.float32)
    return model, tokenizer, 512, 256


def hf_canvas(model, batch: int, prompt_len: int, canvas: int, steps: int, dev: torch.device) -> Callable[[], float]:
    """One timed canvas of transformers' generate() at this batch size, in seconds, per call."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(10, vocab, (batch, prompt_len), device=dev)
    kw = dict(max_new_tokens=canvas, max_denoising_steps=steps, stability_threshold=1, confidence_threshold=1e-9)

    def one_canvas() -> float:
        sync(dev)
        t = time.perf_counter()
        model.generate(ids, **kw)
        sync(dev)
        return time.perf_counter() - t

    return one_canvas


def best_of(one_canvas: Callable[[], float], repeats: int) -> float:
    """The best of `repeats` timed canvases, after a warm-up one."""
    one_canvas()
    return min(one_canvas() for _ in range(repeats))


def add_canvas(engine: LLMEngine, batch: int, prompt_len: int, canvas: int, steps: int) -> None:
    """Queue one canvas of `batch` seeded rows with random prompts; random weights never get confident, so it
    runs all `steps` passes."""
    params = SamplingParams(
        max_tokens=canvas, denoising_steps=steps, confidence_threshold=1e-9, eos_token_ids=[], include_drafts=False
    )
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(10, engine.vocab_size, (prompt_len,), generator=g).tolist()
        engine.add_request(engine.make_request(prompt, params.with_changes(seed=i)))


def engine_canvas(
    engine: LLMEngine, batch: int, prompt_len: int, canvas: int, steps: int, dev: torch.device
) -> Callable[[], float]:
    """One timed canvas of the engine at this batch size, measured like hf_canvas, per call."""

    def one_canvas() -> float:
        add_canvas(engine, batch, prompt_len, canvas, steps)
        sync(dev)
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step(lambda *_: None)
        sync(dev)
        return time.perf_counter() - t

    return one_canvas


def time_engine(
    engine: LLMEngine, batch: int, prompt_len: int, canvas: int, steps: int, dev: torch.device, repeats: int
) -> float:
    return best_of(engine_canvas(engine, batch, prompt_len, canvas, steps, dev), repeats)


def time_interleaved(runners: dict[Hashable, Callable[[], float]], repeats: int) -> dict[Hashable, float]:
    """Best of `repeats` canvases per runner, taking turns (after a warm-up canvas each): a slow spell of a
    shared machine then falls on every runner alike instead of on whichever ran during it."""
    for one_canvas in runners.values():
        one_canvas()
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, one_canvas in runners.items():
            best[name] = min(best[name], one_canvas())
    return best


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


# Where a profiled pass's time goes: the first pattern (lowercase op or kernel name) that matches names the part.
PARTS = [
    ("expert GEMMs (grouped)", r"grouped|groupproblemshape|moe"),  # CUTLASS's grouped GEMM: GroupProblemShape
    ("attention", r"flash|fmha|attention|scaled_dot_product|sdpa"),
    ("other GEMMs", r"gemm|gemv|nvjet|xmma|cutlass|cublas|aten::(mm|addmm|bmm|matmul|linear)$|mkl|onednn"),
    ("sort, scan, histogram", r"sort|radix|histc|cumsum|scan|topk"),
    ("random draws", r"uniform|exponential|philox|normal_|random_"),
    ("dynamo guards and glue", r"dynamo|pregraph bytecode"),
    ("compiled graphs (inductor kernels)", r"triton|compiledfxgraph|cpp_fused|compiled region|inductor"),
    ("copies", r"memcpy|memset|copy|cat$|clone|index|gather|scatter|contiguous"),
    (
        "elementwise and reductions",
        r"elementwise|vectorized|reduce|aten::(mul|add|sub|div|pow|sum|mean|exp|log|"
        r"tanh|gelu|silu|softmax|_softmax|_log_softmax|logsumexp|rsqrt|sqrt|where|max|min|argmax|clamp|neg|fill_)",
    ),
]


def part_of(name: str) -> str:
    low = name.lower()
    return next((part for part, pattern in PARTS if re.search(pattern, low)), "other")


def profile_engine(
    engine: LLMEngine, batch: int, prompt_len: int, canvas: int, steps: int, dev: torch.device, passes: int = 8
) -> dict:
    """`passes` passes of one canvas of `batch` rows under torch.profiler, after its first step (admission and
    prefill) and with the engine warm (time_engine ran first), summed by part and by op: on CUDA the kernels'
    device time, on CPU the ops' self CPU time (inflated by the profiler's own cost per op). `busy_ms` against
    `wall_ms` shows how much of a pass the device (or the host's ops) actually works."""
    from torch.profiler import ProfilerActivity, profile

    add_canvas(engine, batch, prompt_len, canvas, steps)
    engine.step(lambda *_: None)
    passes = min(passes, steps - 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(dev)
        t = time.perf_counter()
        for _ in range(passes):
            engine.step(lambda *_: None)
        sync(dev)
        wall = time.perf_counter() - t
    while engine.has_unfinished():
        engine.step(lambda *_: None)
    totals: dict[str, list[float]] = {}  # name -> [microseconds, calls]
    if dev.type == "cuda":
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                entry = totals.setdefault(evt.name, [0.0, 0])
                entry[0] += evt.device_time_total
                entry[1] += 1
    else:
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                totals[avg.key] = [avg.self_cpu_time_total, avg.count]
    per_pass = 1e-3 / passes  # microseconds in all -> ms per pass
    parts: dict[str, float] = {}
    for name, (us, _) in totals.items():
        parts[part_of(name)] = parts.get(part_of(name), 0.0) + us * per_pass
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "batch": batch,
        "passes": passes,
        "clock": "device (kernels)" if dev.type == "cuda" else "host (self CPU time of ops)",
        "wall_ms": wall * 1e3 / passes,
        "busy_ms": sum(parts.values()),
        "parts_ms": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n, "ms": us * per_pass, "calls": c / passes} for n, (us, c) in top],
    }


def render_profile(mode: str, p: dict) -> str:
    lines = [
        f"Profile, Press {mode}, batch {p['batch']}, {p['passes']} passes after the first: {p['wall_ms']:.1f} ms per "
        f"pass profiled, of which "
        f"{p['busy_ms']:.1f} ms {p['clock']} ({p['busy_ms'] / p['wall_ms']:.0%}).",
        "",
        "| part | ms per pass | share of busy |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} | {v / p['busy_ms']:.0%} |" for k, v in p["parts_ms"].items()]
    lines += ["", "| op or kernel (top 12) | ms per pass | calls per pass |", "|---|---|---|"]
    lines += [f"| `{t['name'][:90]}` | {t['ms']:.2f} | {t['calls']:.1f} |" for t in p["top"]]
    return "\n".join(lines)


# Press's modes, in the order they run (the batch-invariant kernels patch the model in place, so they go last).
MODES = {
    "stock": dict(batch_invariant=False, compile=False),
    "compiled": dict(batch_invariant=False, compile=True),
    "batch-invariant": dict(batch_invariant=True, compile=False),
}


def start_engine(mode: str, model, tokenizer, max_rows: int) -> tuple[LLMEngine, float]:
    """The engine in this mode on the shared weights, and its startup time (the compile, in compiled mode)."""
    start = time.perf_counter()
    engine = LLMEngine(EngineConfig(max_num_seqs=max_rows, **MODES[mode]), loaded=wrap_model(model, tokenizer))
    startup_s = time.perf_counter() - start
    if mode == "compiled":
        print(f"compiled startup {startup_s:.1f} s", flush=True)
    return engine, startup_s


def record(row: dict, name: str, seconds: float, canvas: int, steps: int, dev: torch.device) -> None:
    """A canvas's time into the table's row as pass time and canvas tokens per second (and an engine's peak
    memory), with a progress line, so a run cut off at its time limit still reports what it measured."""
    key = "hf" if name == "transformers" else name
    row[f"{key}_pass_ms"] = seconds / steps * 1e3
    row[f"{key}_canvas_tokens_per_s"] = row["batch"] * canvas / seconds
    if name != "transformers":
        row[f"{name}_peak_memory_gb"] = peak_gb(dev)  # interleaved: the peak of all of them
    print(f"{name} batch {row['batch']}: {row[f'{key}_pass_ms']:.1f} ms per pass", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=48, help="passes per canvas")
    ap.add_argument(
        "--kernels",
        default="all",
        help="comma-separated Press modes to time, or all: stock (transformers' kernels, eager), compiled "
        "(stock kernels in compiled graphs), batch-invariant (eager)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch size; the best is reported")
    ap.add_argument(
        "--invariance",
        type=int,
        default=None,
        help="seeded requests in each mode's batch-invariance check (default: the largest batch; 0 skips it, "
        "which a full-size GPU run may need to fit its time)",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="comma-separated Press modes (or all) to profile after timing: one canvas at the smallest batch, "
        "where a pass's time goes",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="time transformers and the stock and compiled engines at every batch size taking turns, canvas by "
        "canvas (a shared machine's slow spells then fall on all of them alike); peak memory is then the peak of "
        "all of them",
    )
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    # As `press serve` does, and before anything runs: transformers and Press then time under the same
    # allocator settings, whichever goes first.
    tune_host_allocator()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model, tokenizer, prompt_len, canvas = build(args.size, dev)
    print(f"built the {args.size} model on {device_name(dev)} in {time.perf_counter() - t0:.1f} s", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    modes = list(MODES) if args.kernels == "all" else [m for m in MODES if m in args.kernels.split(",")]
    profiled = modes if args.profile == "all" else args.profile.split(",")
    # --interleave: the stock and compiled engines are built first and take turns with transformers, canvas by
    # canvas and batch size by batch size; the batch-invariant mode (it swaps the model's kernels) runs after them.
    engines, compile_s = {}, None
    for mode in [m for m in modes if m != "batch-invariant"] if args.interleave else []:
        engines[mode], startup_s = start_engine(mode, model, tokenizer, max(batches))
        compile_s = startup_s if mode == "compiled" else compile_s
    rows, turns = [{"batch": b} for b in batches], []
    if args.interleave:  # every batch size and mode in turn, so the ratios across batch sizes are fair too
        runners = {}
        for b in batches:
            runners[b, "transformers"] = hf_canvas(model, b, prompt_len, canvas, args.steps, dev)
            runners |= {(b, m): engine_canvas(e, b, prompt_len, canvas, args.steps, dev) for m, e in engines.items()}
        turns = [f"{name} batch {b}" for b, name in runners]  # each round's order
        for (b, name), seconds in time_interleaved(runners, args.repeats).items():
            record(rows[batches.index(b)], name, seconds, canvas, args.steps, dev)
    else:
        for row in rows:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            seconds = best_of(hf_canvas(model, row["batch"], prompt_len, canvas, args.steps, dev), args.repeats)
            record(row, "transformers", seconds, canvas, args.steps, dev)
    invariance, profiles = {}, {}
    for mode in modes:
        if mode in engines:
            engine = engines.pop(mode)
        else:
            engine, startup_s = start_engine(mode, model, tokenizer, max(batches))
            compile_s = startup_s if mode == "compiled" else compile_s
            for row in rows:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                seconds = time_engine(engine, row["batch"], prompt_len, canvas, args.steps, dev, args.repeats)
                record(row, mode, seconds, canvas, args.steps, dev)
        if mode in profiled:
            profiles[mode] = profile_engine(engine, batches[0], prompt_len, canvas, args.steps, dev)
            print(render_profile(mode, profiles[mode]), flush=True)
        n = max(batches) if args.invariance is None else args.invariance
        if n > 0:
            invariance[mode] = invariance_rate(engine, n, prompt_len, canvas, args.steps)
        del engine
    table = render(args, dev, prompt_len, canvas, modes, rows, invariance, compile_s)
    table += "".join(f"\n\n{render_profile(m, p)}" for m, p in profiles.items())
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"engine-{args.size}-{dev.type}"
    (out / f"{tag}.json").write_text(
        json.dumps(
            {
                "device": device_name(dev),
                "torch": torch.__version__,
                "size": args.size,
                "steps": args.steps,
                "repeats": args.repeats,
                "interleaved": args.interleave,
                "turns": turns,
                "prompt_len": prompt_len,
                "canvas": canvas,
                "rows": rows,
                "invariance": invariance,
                "compile_startup_s": compile_s,
                "profiles": profiles,
            },
            indent=1,
        )
    )
    (out / f"{tag}.md").write_text(table + "\n")


TURNS = " (transformers, stock and compiled at every batch size taking turns; peak GB: the peak of all)"


def render(
    args, dev, prompt_len: int, canvas: int, modes: list[str], rows: list[dict], invariance: dict, compile_s
) -> str:
    """One markdown table: transformers, then per Press kernel mode its pass time, ratio to transformers,
    ratio to its own batch 1, canvas tokens/s and peak memory; then each mode's batch-invariance rate."""
    head = ["batch", "transformers pass ms", "transformers canvas tok/s"]
    for mode in modes:
        head += [f"Press {mode} pass ms", "vs transformers", "vs batch 1", "canvas tok/s", "peak GB"]
    lines = [
        f"Engine pass time, {args.size} model, prompt {prompt_len}, canvas {canvas}, {args.steps} passes per canvas, "
        f"best of {args.repeats}{TURNS if args.interleave else ''} — {device_name(dev)}, torch {torch.__version__}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [str(r["batch"]), f"{r['hf_pass_ms']:.1f}", f"{r['hf_canvas_tokens_per_s']:.0f}"]
        for mode in modes:
            ms = r[f"{mode}_pass_ms"]
            cells += [
                f"{ms:.1f}",
                f"{ms / r['hf_pass_ms']:.2f}",
                f"{ms / rows[0][f'{mode}_pass_ms']:.2f}x",
                f"{r[f'{mode}_canvas_tokens_per_s']:.0f}",
                f"{r[f'{mode}_peak_memory_gb']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for mode in modes:
        if mode not in invariance:
            continue
        inv = invariance[mode]
        lines.append(
            f"Batch invariance, {mode} kernels ({inv['requests']} seeded requests alone vs together): "
            f"{inv['identical_requests']:.0%} of requests and {inv['identical_tokens']:.2%} of tokens identical."
        )
    if compile_s is not None:
        first, last = rows[0], rows[-1]
        speedups = [f"{first['hf_pass_ms'] / first['compiled_pass_ms']:.2f}x faster than transformers"]
        if "stock" in modes:
            speedups.append(f"{first['stock_pass_ms'] / first['compiled_pass_ms']:.2f}x than Press stock eager")
        if "batch-invariant" in modes:
            speedups.append(f"{first['batch-invariant_pass_ms'] / first['compiled_pass_ms']:.2f}x than batch-invariant")
        ratio = last["compiled_canvas_tokens_per_s"] / first["hf_canvas_tokens_per_s"]
        lines.append(
            f"Compiled mode: startup (load + compile of batch buckets up to {last['batch']}) {compile_s:.1f} s with "
            f"this machine's inductor cache as it was; compiled batch-1 pass {' and '.join(speedups)}; compiled "
            f"batch-{last['batch']} canvas tok/s {last['compiled_canvas_tokens_per_s']:.0f} = {ratio:.1f}x "
            "transformers' batch-1."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
