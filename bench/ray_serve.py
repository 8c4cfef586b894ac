"""Press on Ray Serve against `press serve`, same run, same machine, built-in model, loopback only.

    python bench/ray_serve.py                      # press serve, Ray with 1 replica, Ray with 2 replicas
    python bench/ray_serve.py --requests 48 --clients 8

For each setup: requests/s with `--clients` concurrent non-streaming chat requests (every request does the same
work: ignore_eos, fixed max_tokens and denoising steps), and the latency of one request alone (median of
`--single` sequential requests), from which the Ray path's overhead over `press serve` follows. Writes JSON and a
markdown table to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(extra: list[str], replicas: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"press-bench-ray-{port}.log", "w")  # noqa: SIM115
    command = [sys.executable, "-m", "server.cli", "serve", "--model", "tiny-random", "--port", str(port),
               "--log-level", "warning", "--no-log-requests", *extra]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "RAY_ADDRESS": ""})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log.name}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                health = httpx.get(url + "/health", timeout=2).json()
                if health.get("replicas", 1) >= replicas:
                    return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def body(i: int, args: argparse.Namespace) -> dict:
    return {"model": "tiny-random", "messages": [{"role": "user", "content": f"Request {i}: say something."}],
            "max_tokens": args.max_tokens, "denoising_steps": args.steps, "ignore_eos": True, "seed": i}  # fmt: skip


async def load(url: str, args: argparse.Namespace) -> float:
    """Requests per second with `clients` requests in flight at a time."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        queue = list(range(args.requests))

        async def client() -> None:
            while queue:
                i = queue.pop()
                r = await http.post("/v1/chat/completions", json=body(i, args))
                r.raise_for_status()

        await http.post("/v1/chat/completions", json=body(10_000, args))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        return args.requests / (time.perf_counter() - t0)


def single(url: str, args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds of one chat request alone, and of GET /v1/models (no engine work: the routing alone)."""
    with httpx.Client(base_url=url, timeout=600) as http:
        times, models = [], []
        for i in range(args.single):
            t0 = time.perf_counter()
            http.post("/v1/chat/completions", json=body(20_000 + i, args)).raise_for_status()
            times.append(time.perf_counter() - t0)
        for _ in range(50):
            t0 = time.perf_counter()
            http.get("/v1/models").raise_for_status()
            models.append(time.perf_counter() - t0)
        return statistics.median(times), statistics.median(models)


async def autoscale(url: str, args: argparse.Namespace) -> dict:
    """Load a 1-2 replica autoscaling deployment with twice max_num_seqs clients: seconds until the second replica
    reports, and requests/s over the run."""
    clients = 2 * args.max_num_seqs
    samples: list[tuple[float, int]] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        queue = list(range(args.autoscale_requests))
        done = asyncio.Event()

        async def client() -> None:
            while queue:
                i = queue.pop()
                (await http.post("/v1/chat/completions", json=body(30_000 + i, args))).raise_for_status()

        async def watch() -> None:
            while not done.is_set():
                health = (await http.get("/health")).json()
                samples.append((time.perf_counter() - t0, health["replicas"]))
                await asyncio.sleep(0.5)

        t0 = time.perf_counter()
        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        done.set()
        await watcher
    second = next((t for t, n in samples if n >= 2), None)
    return {"clients": clients, "requests": args.autoscale_requests, "requests_per_s": args.autoscale_requests / wall,
            "seconds_to_second_replica": second, "max_replicas_seen": max(n for _, n in samples)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--single", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--autoscale-requests", type=int, default=400, help="requests of the autoscaling run (0: skip)")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="the engine's default; the autoscaling target")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    # Ray sets a replica's OMP_NUM_THREADS (torch's threads) to its CPUs: one replica gets the machine's cores, as
    # press serve does, and two replicas half each.
    cores = str(os.cpu_count() or 2)
    half = str(max(1, (os.cpu_count() or 2) // 2))
    ray = ["--ray", "--ray-replica-cpus"]
    setups = [("press serve", [], 1),
              (f"Ray, 1 replica ({cores} CPUs)", [*ray, cores, "--ray-replicas", "1"], 1),
              (f"Ray, 2 replicas ({half} CPU each)", [*ray, half, "--ray-replicas", "2"], 2)]  # fmt: skip
    rows = []
    for label, extra, replicas in setups:
        proc, url = start(extra, replicas)
        try:
            rps = asyncio.run(load(url, args))
            latency, models = single(url, args)
        finally:
            stop(proc)
        rows.append({"setup": label, "requests_per_s": rps, "single_request_s": latency, "models_get_s": models})
        print(f"{label}: {rps:.2f} req/s, one request {latency * 1000:.0f} ms, GET /v1/models {models * 1000:.1f} ms",
              flush=True)  # fmt: skip
    scaled = None
    if args.autoscale_requests:
        proc, url = start([*ray, half, "--ray-min-replicas", "1", "--ray-max-replicas", "2"], 1)
        try:
            scaled = asyncio.run(autoscale(url, args))
        finally:
            stop(proc)
        print(f"autoscaling 1-2: {scaled}", flush=True)
    base = rows[0]
    for row in rows:
        row["throughput_vs_press_serve"] = row["requests_per_s"] / base["requests_per_s"]
        row["overhead_ms_vs_press_serve"] = (row["single_request_s"] - base["single_request_s"]) * 1000
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    lines = [
        f"Press on Ray Serve vs press serve, tiny-random, {args.clients} clients x {args.requests} non-streaming chat "
        f"requests (max_tokens {args.max_tokens}, {args.steps} denoising steps, ignore_eos); {machine}.",
        "",
        "| setup | requests/s | vs press serve | one request alone (median) | overhead vs press serve "
        "| GET /v1/models |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['requests_per_s']:.2f} | {r['throughput_vs_press_serve']:.2f}x | "
                     f"{r['single_request_s'] * 1000:.0f} ms | "
                     f"{r['overhead_ms_vs_press_serve']:+.0f} ms | {r['models_get_s'] * 1000:.1f} ms |")  # fmt: skip
    if scaled is not None:
        second = scaled["seconds_to_second_replica"]
        lines += ["", f"Autoscaling from 1 to at most 2 replicas (target: {args.max_num_seqs} ongoing requests per "
                  f"replica), {scaled['clients']} clients x {scaled['requests']} requests: the second replica reported "
                  + (f"{second:.0f} s into the load" if second is not None else "never (the load ended first)")
                  + f"; {scaled['requests_per_s']:.2f} requests/s over the run."]  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray-serve.md").write_text(table)
    result = {"machine": machine, "args": vars(args), "rows": rows, "autoscaling": scaled}
    (out / "ray-serve.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
