"""Quantized weights: memory and pass time of each format against the unquantized model, in the same run.

    python bench/quantization.py --size mid     # CPU: a 0.2B-parameter random DiffusionGemma, saved once and loaded
                                                # by `press`'s own loader in a fresh process per format
    python bench/quantization.py --size full    # GPU: full-size random DiffusionGemma-26B-A4B (bf16, built on the
                                                # GPU), quantized there per format

Per format (none, int8, int4, fp8): the weights' memory as measured (CPU: anonymous resident memory the load
added, every weight read once; CUDA: memory allocated after the load) against `press plan`'s figure, and at each
batch size the pass time and (CUDA) the peak allocated memory against the plan's weights + KV + pass temporaries.
Random weights never get confident, so every canvas runs all its passes.
Prints a markdown table and writes JSON + the table to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE.parent)]

import torch  # noqa: E402


def _load_bench_engine():
    """bench/engine.py (its timing helpers and the full-size config), loaded by path: its file name is the
    engine package's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_engine", _HERE / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_engine = _load_bench_engine()

METHODS = ("none", "int8", "int4", "fp8")
MID_TEXT = dict(
    vocab_size=32768, hidden_size=1024, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=4, head_dim=128, global_head_dim=256, num_global_key_value_heads=2, sliding_window=512,
    num_experts=16, top_k_experts=4, moe_intermediate_size=512, max_position_embeddings=8192, enable_moe_block=True,
    layer_types=["sliding_attention"] * 5 + ["full_attention"],
)  # fmt: skip
MID_VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16)  # fmt: skip


def rss(kind: str = "RssAnon") -> int:
    """Resident memory of one kind, after giving freed heap back to the system: RssAnon (what the process
    allocated: quantized weights) or RssFile (mapped files: the checkpoint, whose tensors transformers maps)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields[kind].split()[0]) * 1024


def build_mid(path: Path) -> None:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, GenerationConfig

    from engine.tiny_random import _ASSETS

    cfg = DiffusionGemmaConfig(text_config=MID_TEXT, vision_config=MID_VISION, canvas_length=64)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    model.generation_config = GenerationConfig(eos_token_id=1)
    model.save_pretrained(path)
    for f in _ASSETS.iterdir():
        (path / f.name).write_bytes(f.read_bytes())


def measure(method: str, size: str, path: str | None, batches: list[int], steps: int) -> dict:
    """One format in this process: load, then time passes (bench/engine.py's timing) per batch size."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    dev = torch.device("cuda" if size == "full" else "cpu")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else rss()
    file_before = rss("RssFile") if dev.type == "cpu" else 0
    t0 = time.perf_counter()
    if size == "full":
        engine = LLMEngine(
            EngineConfig(max_num_seqs=max(batches), compile=False, batch_invariant=False),
            loaded=build_full(method, dev),
        )
    else:
        engine = LLMEngine(EngineConfig(model=path, quantization=method, max_num_seqs=max(batches),
                                        prefix_cache_tokens=0, gpu_memory="64GiB"))  # fmt: skip
    load_s = time.perf_counter() - t0
    if dev.type == "cpu":  # the loader maps the checkpoint: read every weight so its pages are resident
        for t in (*engine.loaded.model.parameters(), *engine.loaded.model.buffers()):
            _touch(t)
    bench_engine.sync(dev)
    after = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else rss()
    plan = engine.loaded.plan
    prompt_len, canvas = (512, 256) if size == "full" else (64, 64)
    row = {"method": method, "dtype": str(engine.loaded.dtype).removeprefix("torch."), "load_s": load_s,
           "weights_measured": after - before, "weights_plan": plan.weights, "batches": {}}  # fmt: skip
    if dev.type == "cpu":  # anonymous (above) and file-mapped resident memory the load added
        row["mapped_checkpoint"] = rss("RssFile") - file_before
    for b in batches:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = bench_engine.time_engine(engine, b, prompt_len, canvas, steps, dev, repeats=1)
        # CPU has no allocation high-water mark (the process's RSS peak counts mapped checkpoint pages).
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        row["batches"][b] = {
            "pass_ms": seconds / steps * 1e3,
            "peak_measured": peak,
            "peak_plan": plan.weights + plan.pass_bytes(b) + plan.running_bytes([prompt_len + canvas] * b),
        }
    return row


def _touch(t: torch.Tensor) -> None:
    names = getattr(type(t), "tensor_data_names", None)
    if names is None:
        t.detach().view(-1)[:: max(1, 4096 // t.element_size())].float().sum()  # one read per page
        return
    for name in (*names, *(getattr(type(t), "optional_tensor_data_names", None) or ())):
        if getattr(t, name, None) is not None:
            _touch(getattr(t, name))


def build_full(method: str, dev: torch.device):
    """The full-size random model in bf16 on the GPU, quantized there; its plan from the same config."""
    from transformers import AutoTokenizer, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from engine.loader import wrap_model
    from engine.memory_plan import build_plan
    from engine.quantization import quantize_model
    from engine.tiny_random import _ASSETS

    cfg = DiffusionGemmaConfig.from_pretrained(bench_engine.FULL_CONFIG)
    torch.manual_seed(0)
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        model = DiffusionGemmaForBlockDiffusion(cfg).eval()
        torch.set_default_dtype(torch.float32)
    quantize_model(model, method, dev)
    torch.cuda.empty_cache()
    loaded = wrap_model(model, AutoTokenizer.from_pretrained(_ASSETS), max_model_len=8192)
    loaded.quantization = method
    loaded.plan = build_plan(cfg, torch.bfloat16, method, "cuda", name="diffusiongemma-26b-a4b-it (random)")
    return loaded


def render(size: str, device: str, steps: int, rows: list[dict]) -> str:
    """CUDA: weights allocated vs plan. CPU: the anonymous memory the load added (quantized weights are copies)
    and the checkpoint's file pages it touched (transformers maps the checkpoint: unquantized weights are those
    pages; a quantized load reads every page once, and the kernel may drop the ones no tensor uses)."""
    gb = 1e9
    cpu = "mapped_checkpoint" in rows[0]
    batches = list(rows[0]["batches"])
    head = ["format", "dtype", "plan weights GB"]
    head += ["anonymous GB", "checkpoint pages GB"] if cpu else ["allocated GB", "vs none"]
    for b in batches:
        head += [f"batch {b} pass ms", "vs none"] + ([] if cpu else [f"batch {b} peak GB (plan)"])
    lines = [f"Quantized weights, {size} model, {steps} passes per canvas — {device}, torch {torch.__version__}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    base = rows[0]
    for r in rows:
        cells = [r["method"], r["dtype"], f"{r['weights_plan'] / gb:.3f}"]
        if cpu:
            cells += [f"{r['weights_measured'] / gb:.3f}", f"{r['mapped_checkpoint'] / gb:.3f}"]
        else:
            cells += [f"{r['weights_measured'] / gb:.3f}", f"{r['weights_measured'] / base['weights_measured']:.2f}"]
        for b in batches:
            x, x0 = r["batches"][b], base["batches"][b]
            cells += [f"{x['pass_ms']:.1f}", f"{x['pass_ms'] / x0['pass_ms']:.2f}"]
            if not cpu:
                cells.append(f"{x['peak_measured'] / gb:.2f} ({x['peak_plan'] / gb:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["mid", "full"], default="mid")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=8, help="passes per canvas")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.size, args.path, batches, args.steps)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mid"
        if args.size == "mid":
            build_mid(path)
        rows = []
        for method in args.methods.split(","):  # a fresh process each: resident memory starts clean
            out = subprocess.run([sys.executable, __file__, "--size", args.size, "--child", method, "--path",
                                  str(path), "--batches", args.batches, "--steps", str(args.steps)],
                                 capture_output=True, text=True)  # fmt: skip
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{method} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line.removeprefix("RESULT ")))
            rows[-1]["batches"] = {int(k): v for k, v in rows[-1]["batches"].items()}
            print(f"{method}: {rows[-1]}", file=sys.stderr, flush=True)
    dev = torch.device("cuda" if args.size == "full" else "cpu")
    device_name = bench_engine.device_name(dev)
    table = render(args.size, device_name, args.steps, rows)
    print(table)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"quantization-{args.size}-{dev.type}"
    (out_dir / f"{tag}.json").write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                                     "steps": args.steps, "rows": rows}, indent=1))  # fmt: skip
    (out_dir / f"{tag}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
