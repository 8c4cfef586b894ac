"""Fuzz a real `press serve` on the built-in model with Schemathesis, every check on, against its own
/openapi.json; prints a one-line summary and exits non-zero on any failure or error.

    python -m tests.fuzz.run --examples 500 --workers 4 --request-timeout 0.5   # `make fuzz`: >= 10,000 requests
    python -m tests.fuzz.run --examples 4        # the bounded run tests/test_fuzz.py makes

The server runs with a small context (96 tokens) and a short request timeout (3 s; `make fuzz` 0.5 s), so that the
largest valid requests (hundreds of passes per canvas, 16 choices) end in bounded time; hooks.py lists the only
refusals excused.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Image URLs the fuzzer makes up are never fetched (that answer, a 400, is part of the contract too).
SERVER_ARGS = ["--model", "tiny-random", "--max-model-len", "96", "--log-level", "warning", "--no-image-fetch"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited before it was ready")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the server did not get ready")


def run(examples: int, seed: int | None, log: Path, request_timeout: float = 3.0, workers: int = 1) -> dict:
    """Start a server, fuzz it with `workers` Schemathesis processes at once (each its own seed; Hypothesis is not
    thread-safe, so parallel clients are processes, not `st --workers`), stop it; returns the summed summary and
    the server's fate."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    with open(log, "w") as server_log:
        server = subprocess.Popen([str(bin_dir / "press"), "serve", "--port", str(port), *SERVER_ARGS,
                                   "--request-timeout", str(request_timeout)],
                                  stdout=server_log, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
        try:
            wait_ready(url, server)
            procs, outs = [], []
            env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks"}
            start = time.monotonic()
            for i in range(workers):
                cmd = [str(bin_dir / "st"), "run", url + "/openapi.json", "--checks", "all", "-n", str(examples),
                       "--workers", "1", "--no-color", "--request-timeout", "60",
                       "--generation-database", "none"]  # fmt: skip
                if seed is not None:
                    cmd += ["--seed", str(seed + i)]
                outs.append(tempfile.TemporaryFile("w+"))  # noqa: SIM115 - a file, not a pipe: nothing blocks
                procs.append(subprocess.Popen(cmd, stdout=outs[-1], stderr=subprocess.STDOUT, cwd=ROOT, env=env))
            for p in procs:
                p.wait()
            outputs = []
            for f in outs:
                f.seek(0)
                outputs.append(f.read())
                f.close()
            seconds = time.monotonic() - start
            alive = server.poll() is None
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    result = {"exit_code": max(p.returncode for p in procs), "generated": 0, "outcome": [], "filtered": 0,
              "seconds": seconds, "server_alive": alive, "output": "\n\n".join(outputs)}  # fmt: skip
    for out in outputs:
        cases = re.search(r"(\d+) generated, (.*)", out)
        result["generated"] += int(cases.group(1)) if cases else 0
        result["outcome"].append(cases.group(2).strip() if cases else "no summary")
        result["filtered"] += int(m.group(1)) if (m := re.search(r"Filtered: (\d+)", out)) else 0
    result["outcome"] = "; ".join(result["outcome"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1500, help="Schemathesis cases per operation and phase")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--request-timeout", type=float, default=3.0, help="the server's request timeout in seconds")
    ap.add_argument("--workers", type=int, default=1, help="Schemathesis processes at once (the server batches them)")
    ap.add_argument("--server-log", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "press-fuzz-server.log"))
    args = ap.parse_args()
    result = run(args.examples, args.seed, Path(args.server_log), args.request_timeout, args.workers)
    ok = result["exit_code"] == 0 and result["server_alive"]
    report = Path(args.server_log).with_name("press-fuzz-report.txt")
    report.write_text(result["output"])
    if not ok:
        print(result["output"][-6000:])
        print(f"full Schemathesis report: {report}")
    print(
        f"fuzz: {result['generated']} requests generated ({result['outcome']}), {result['filtered']} excused "
        f"refusals/timeouts, {result['seconds']:.0f} s, server {'alive' if result['server_alive'] else 'DEAD'} "
        f"-> {'PASS' if ok else 'FAIL'}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
