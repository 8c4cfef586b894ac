"""Drive a running Press server with concurrent streaming clients and report serving metrics.

    python bench/serve.py --clients 8 --requests 32            # against http://127.0.0.1:8000
    python bench/serve.py --spawn --compare-serial             # start a tiny-random server, 8 serial vs 8 at once

Per request it records time to first draft (first refinement pass), time to first content (first committed
canvas), end-to-end latency, completion tokens and tokens per forward (from the finish chunk's `diffusion`
stats). Prints a markdown table; writes JSON and the table to bench/results/. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def one(http: httpx.AsyncClient, model: str, i: int, args: argparse.Namespace) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Question number {i}: tell me something."}],
        "max_tokens": args.max_tokens,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Every request does the same work whatever the model samples, as in vLLM's benchmarks.
        "ignore_eos": True,
    }
    if args.denoising_steps:
        body["denoising_steps"] = args.denoising_steps
    t0 = time.perf_counter()
    first_draft = first_content = None
    usage, stats = None, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter() - t0
            for ch in chunk.get("choices", []):
                if "draft" in ch and first_draft is None:
                    first_draft = now
                if ch.get("delta", {}).get("content") and first_content is None:
                    first_content = now
                if ch.get("diffusion"):
                    stats = ch["diffusion"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {
        "ttfd": first_draft,
        "ttfc": first_content,
        "e2e": time.perf_counter() - t0,
        "completion_tokens": usage["completion_tokens"] if usage else 0,
        "tokens_per_forward": stats["tokens_per_forward"] if stats else None,
    }


async def run(url: str, model: str, clients: int, requests: int, args: argparse.Namespace) -> tuple[list[dict], float]:
    sem = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:

        async def guarded(i: int) -> dict:
            async with sem:
                return await one(http, model, i, args)

        health: list[float] = []

        async def probe(done: asyncio.Event) -> None:
            """/health latency while the requests run (liveness must not wait on a pass)."""
            while not done.is_set():
                t = time.perf_counter()
                await http.get("/health")
                health.append(time.perf_counter() - t)
                await asyncio.sleep(0.05)

        done = asyncio.Event()
        prober = asyncio.create_task(probe(done))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(requests)))
        wall = time.perf_counter() - t0
        done.set()
        await prober
        results = list(results)
        if results and health:
            results[0]["health"] = health
        return results, wall


def summarize(label: str, results: list[dict], wall: float) -> dict:
    toks = sum(r["completion_tokens"] for r in results)
    tpf = [r["tokens_per_forward"] for r in results if r["tokens_per_forward"] is not None]
    return {
        "run": label,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "committed_tokens_per_s": toks / wall,
        "ttfd_p50_ms": pct([r["ttfd"] for r in results if r["ttfd"] is not None], 50) * 1e3,
        "ttfd_p95_ms": pct([r["ttfd"] for r in results if r["ttfd"] is not None], 95) * 1e3,
        "ttfc_p50_ms": pct([r["ttfc"] for r in results if r["ttfc"] is not None], 50) * 1e3,
        "ttfc_p95_ms": pct([r["ttfc"] for r in results if r["ttfc"] is not None], 95) * 1e3,
        "e2e_p50_ms": pct([r["e2e"] for r in results], 50) * 1e3,
        "e2e_p95_ms": pct([r["e2e"] for r in results], 95) * 1e3,
        "tokens_per_forward": statistics.mean(tpf) if tpf else float("nan"),
        "health_p50_ms": pct(results[0].get("health", [float("nan")]), 50) * 1e3,
        "health_max_ms": max(results[0].get("health", [float("nan")])) * 1e3,
    }


def spawn_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = args.port
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            args.model,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--max-num-seqs",
            str(args.max_num_seqs),
            *(["--no-batch-invariant"] if args.no_batch_invariant else []),
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--spawn", action="store_true", help="start `press serve` on --port with --model")
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--no-batch-invariant", action="store_true", help="spawned server uses stock kernels")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--denoising-steps", type=int, default=None)
    ap.add_argument("--compare-serial", action="store_true", help="also run the same requests one at a time")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each kind, alternated; the fastest is reported")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    proc = None
    if args.spawn:
        proc, args.url = spawn_server(args)
    try:
        model = httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(run(args.url, model, args.clients, min(args.clients, args.requests), args))  # warm-up
        kinds = [(f"{args.clients} concurrent clients", args.clients)]
        if args.compare_serial:
            kinds.insert(0, ("serial (1 client)", 1))
        # Serial and concurrent runs alternate, so a noisy neighbour on a shared machine hits both alike.
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for label, clients in kinds:
                row = summarize(label, *asyncio.run(run(args.url, model, clients, args.requests, args)))
                if label not in best or row["wall_s"] < best[label]["wall_s"]:
                    best[label] = row
        rows = [best[label] for label, _ in kinds]
    finally:
        if proc:
            proc.terminate()
            proc.wait(10)
    head = (
        f"Serving, model {model}, {args.requests} streaming chat requests, max_tokens {args.max_tokens}, "
        f"denoising_steps {args.denoising_steps or 'model default'} — client on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, best of {args.repeats}"
    )
    if args.no_batch_invariant:
        head += ", server on stock kernels (batch invariance off)"
    lines = [
        head,
        "",
        "| run | req/s | committed tok/s | TTFD p50/p95 ms | TTFC p50/p95 ms | e2e p50/p95 ms | tokens/forward "
        "| /health p50/max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['requests_per_s']:.2f} | {r['committed_tokens_per_s']:.0f} | "
            f"{r['ttfd_p50_ms']:.0f} / {r['ttfd_p95_ms']:.0f} | {r['ttfc_p50_ms']:.0f} / {r['ttfc_p95_ms']:.0f} "
            f"| {r['e2e_p50_ms']:.0f} / {r['e2e_p95_ms']:.0f} | {r['tokens_per_forward']:.2f} "
            f"| {r['health_p50_ms']:.1f} / {r['health_max_ms']:.1f} |"
        )
    if args.compare_serial:
        lines += [
            "",
            f"Concurrent vs serial: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x faster for the same "
            f"{args.requests} requests.",
        ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "serve-stock-kernels" if args.no_batch_invariant else "serve"
    (out / f"{tag}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / f"{tag}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
