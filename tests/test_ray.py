"""Press on Ray Serve: `press serve --ray` with two replicas of the built-in model on a local Ray instance.

The project's HTTP tests (tests/test_http.py, tests/test_errors.py) run here against the Ray ingress, with the
official `openai` package, as they run against `press serve`. Then what only Ray adds: a follow-up turn lands on
the replica that served the first, every replica's metrics come out of one /metrics, and killing one replica's
process under load loses no request that had not started streaming while the service keeps answering.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.ray_serve.admission import Admission
from server.ray_serve.routing import AffinityTable, affinity_keys
from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[1]

# The project's own HTTP tests, collected again here: in this module `server` is the Ray ingress.
from tests.test_errors import test_bad_input_is_a_clear_4xx  # noqa: E402, F401
from tests.test_http import (  # noqa: E402, F401
    test_async_client_concurrent_requests,
    test_chat_non_stream_usage_is_exact,
    test_client_disconnect_stops_work,
    test_drafts_can_be_turned_off,
    test_max_tokens_not_a_multiple_of_the_canvas,
    test_models_and_health,
    test_n_choices_and_prompt_lists,
    test_raw_sse_framing_and_schemas,
    test_same_seed_same_answer_and_greedy,
    test_stop_string_across_canvas_boundary,
    test_stream_matches_non_stream_chat,
    test_stream_matches_non_stream_completions,
)

# ------------------------------------------------------------------------------------------ without Ray


def test_affinity_keys_follow_the_conversation():
    first = {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]}
    follow = {"model": "m", "messages": [*first["messages"], {"role": "assistant", "content": "yo"},
                                         {"role": "user", "content": "more"}]}  # fmt: skip
    other = {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "bye"}]}
    a, b, c = affinity_keys(first), affinity_keys(follow), affinity_keys(other)
    assert b[: len(a)] == a and len(b) == 4  # the follow-up extends the first turn's keys
    assert c[0] == a[0] and c[1] != a[1]  # same system prompt, different conversation
    long_prompt = {"model": "m", "prompt": "x" * 600}
    assert len(affinity_keys(long_prompt)) == 2 and affinity_keys({"model": "m"}) == []

    table = AffinityTable(capacity=3)
    table.record(a, "r1")
    table.record(c, "r2")
    assert table.lookup(b, {"r1", "r2"}) == "r1"  # longest known prefix
    assert table.lookup(b, {"r2"}) == "r2"  # r1 gone: the shared system prompt's replica
    table.forget("r2")
    assert table.lookup(c, {"r1", "r2"}) is None  # c[0] was last recorded for r2, now forgotten


def test_admission_holds_what_the_replicas_and_one_router_queue_hold():
    """Each replica holds its slots and queue (4 + 2 here), the router one more queue (2); a ticket given back twice
    frees one place; the capacity follows the replica count (an autoscaled deployment's changes)."""
    replicas = [2]
    admission = Admission(per_replica=6, queue=2, replicas=lambda: replicas[0])
    tickets = [admission.admit() for _ in range(14)]
    assert all(tickets) and admission.admit() is None and admission.capacity == 14
    tickets[0].release()
    tickets[0].release()
    assert admission.in_flight == 13 and admission.admit() is not None and admission.admit() is None
    replicas[0] = 3
    assert admission.capacity == 20 and sum(admission.admit() is not None for _ in range(10)) == 6


def test_ray_flag_without_ray_says_how_to_install():
    code = "import sys; sys.modules['ray'] = None; from server.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code, "serve", "--ray", "--model", "tiny-random"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0
    assert "pip install 'press[ray]'" in out.stderr


# -------------------------------------------------------------------------------------------- with Ray

pytest.importorskip("ray.serve")


class RayServer(ServerProcess):
    def stop(self) -> None:  # Ray needs longer than uvicorn to wind down its controller and replicas
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
        self.log.close()


def replicas(base_url: str) -> list[dict]:
    return httpx.get(base_url + "/replicas", timeout=10).json()["data"]


def wait_replicas(base_url: str, n: int, timeout: float = 180, gone_pid: int | None = None) -> list[dict]:
    """The replicas once `n` report (and none from `gone_pid`: a dead replica's last report lingers a while)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = [r for r in replicas(base_url) if r["pid"] != gone_pid]
            if len(found) == n and all(r["reported_s_ago"] < 2 for r in found):
                return found
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{n} replicas did not report")


@pytest.fixture(scope="module")
def server(tiny_path):
    proc = RayServer(["--ray", "--model", str(tiny_path), "--served-model-name", "tiny-random", "--ray-replicas", "2",
                      "--ray-replica-cpus", "0.5"], env={"RAY_ADDRESS": "", "RAY_DEDUP_LOGS": "0"})  # fmt: skip
    try:
        proc.wait_ready(timeout=240)
        wait_replicas(proc.base_url, 2)
        yield proc
    finally:
        proc.stop()


def test_a_follow_up_turn_lands_on_the_replica_that_served_the_first(server):
    http = httpx.Client(base_url=server.base_url, timeout=120)
    served = set()
    for i in range(4):
        messages = [{"role": "user", "content": f"Conversation {i}: tell me about diffusion."}]
        first = http.post("/v1/chat/completions", json={"model": "tiny-random", "messages": messages, "seed": i,
                                                        "max_tokens": 8, "denoising_steps": 2})  # fmt: skip
        assert first.status_code == 200
        replica = first.headers["x-press-replica"]
        served.add(replica)
        messages += [{"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And then?"}]  # fmt: skip
        for _ in range(2):
            follow = http.post("/v1/chat/completions", json={"model": "tiny-random", "messages": messages,
                                                             "max_tokens": 8, "denoising_steps": 2})  # fmt: skip
            assert follow.headers["x-press-replica"] == replica
    assert served <= {r["id"] for r in replicas(server.base_url)}


def test_every_replicas_metrics_in_one_exposition(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    ids = {r["id"] for r in replicas(server.base_url)}
    for i in range(6):
        client.completions.create(model="tiny-random", prompt=f"metrics {i} " * (i + 1), max_tokens=4,
                                  extra_body={"denoising_steps": 1})  # fmt: skip
    time.sleep(1.5)  # one report interval and more
    text = httpx.get(server.base_url + "/metrics", timeout=10).text

    def series(name: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(name + "{")]

    running = series("press:num_requests_running")
    assert {line.split('replica="')[1].split('"')[0] for line in running} == ids  # every replica, labelled
    assert text.count("# TYPE press:num_requests_running gauge") == 1  # merged, not concatenated
    successes = series("press:request_success_total")
    assert sum(float(line.rsplit(" ", 1)[1]) for line in successes) >= 6
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok" and health["replicas"] == 2


def test_an_oversized_body_is_refused_at_the_ingress(server):
    """A body over max_body_bytes (32 MiB) is refused by the ingress itself, before any replica sees it."""
    big = b'{"model": "tiny-random", "prompt": "' + b"x" * (32 * 1024 * 1024) + b'"}'
    r = httpx.post(server.base_url + "/v1/completions", content=big, timeout=120,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "x-press-replica" not in r.headers


def test_killing_a_replica_under_load_loses_no_unstarted_request(server):
    """Eight non-streaming requests and two streams in flight; one replica's process is killed. Every
    non-streaming request (nothing of it was sent yet) still gets its answer from the other replica; a stream the
    dead replica was serving ends with an error event instead of hanging; the service keeps answering and Ray
    brings the replica back."""
    before = replicas(server.base_url)
    # Long enough (no early EOS) that the victim is still serving when the kill lands: its figures are up to half a
    # second old.
    body = {"model": "tiny-random", "max_tokens": 256, "denoising_steps": 8, "ignore_eos": True}

    def plain(i: int) -> int:
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                       json={**body, "messages": [{"role": "user", "content": f"load {i}"}], "seed": i})  # fmt: skip
        return r.status_code

    def streamed(i: int) -> list[str]:
        events = []
        with httpx.stream(
            "POST",
            server.base_url + "/v1/chat/completions",
            timeout=120,
            json={**body, "stream": True, "messages": [{"role": "user", "content": f"s{i}"}]},
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        return events

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        plains = [pool.submit(plain, i) for i in range(8)]
        streams = [pool.submit(streamed, i) for i in range(2)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(r["running"] for r in replicas(server.base_url)) < 4:
            time.sleep(0.1)
        victim = max(replicas(server.base_url), key=lambda r: r["running"])
        assert victim["running"] > 0
        os.kill(victim["pid"], signal.SIGKILL)
        statuses = [f.result(timeout=150) for f in plains]
        stream_events = [f.result(timeout=150) for f in streams]
    assert statuses == [200] * 8
    health = httpx.get(server.base_url + "/health").json()
    assert health["retried_requests"] + health["broken_streams"] >= 1  # the dead replica's requests were moved
    for events in stream_events:
        assert events[-1] == "[DONE]"  # ended, one way or the other
        errors = [json.loads(e)["error"] for e in events[:-1] if '"error"' in e[:10]]
        assert not errors or errors[0]["code"] == "replica_died"
    ok = httpx.post(server.base_url + "/v1/completions", timeout=60,
                    json={"model": "tiny-random", "prompt": "still there?", "max_tokens": 4})  # fmt: skip
    assert ok.status_code == 200
    after = wait_replicas(server.base_url, 2, gone_pid=victim["pid"])  # Ray brought a replica back
    assert len(before) == 2 and victim["pid"] not in {r["pid"] for r in after}


def test_a_full_deployment_answers_503_with_retry_after(tiny_path):
    """One replica with one slot and a queue of one: of five long requests at once, the three the deployment holds
    (one running and one waiting in the replica, one at the router) get 200 and the other two 503 server_overloaded
    with Retry-After. A stream the client abandons gives its place back."""
    proc = RayServer(["--ray", "--model", str(tiny_path), "--served-model-name", "tiny-random", "--ray-replicas", "1",
                      "--ray-replica-cpus", "0.5", "--max-num-seqs", "1", "--max-queue", "1"],
                     env={"RAY_ADDRESS": ""})  # fmt: skip
    try:
        proc.wait_ready(timeout=240)
        # Long enough (about a second each) that none finishes while the others are still being admitted.
        body = {"model": "tiny-random", "prompt": "busy", "max_tokens": 1024, "ignore_eos": True, "denoising_steps": 4}
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: httpx.post(proc.base_url + "/v1/completions", json=body, timeout=120),
                                    range(5)))  # fmt: skip
        assert sorted(r.status_code for r in answers) == [200, 200, 200, 503, 503]
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "server_overloaded" and r.headers["retry-after"]
        health = httpx.get(proc.base_url + "/health").json()
        assert (health["in_flight"], health["capacity"]) == (0, 3)

        # A stream of a minute or more (256 passes per canvas), abandoned after its first event.
        slow = {**body, "stream": True, "denoising_steps": 256}
        with httpx.stream("POST", proc.base_url + "/v1/completions", json=slow, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        deadline = time.monotonic() + 15
        while httpx.get(proc.base_url + "/health").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(proc.base_url + "/health").json()["in_flight"] == 0
    finally:
        proc.stop()
