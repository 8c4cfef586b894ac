"""Prometheus metrics of the engine, named after vLLM's where the concept is the same (prefix `press:`).

Each engine owns its registry, so several engines in one process (tests, benchmarks) never collide.
Observations happen on the engine thread at the moments they describe: admission, the end of a prefill,
each pass, each canvas commit and each finished request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.request import DenoiseState

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
PASS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.25, 0.5, 1, 2.5)
BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
TPF = (0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"press:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"press:{name}", doc, labels, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to the first committed canvas.", LATENCY)
        self.ttfd = hist("time_to_first_draft_seconds", "Arrival to the first refinement pass.", LATENCY)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to the end of the request.", LATENCY)
        self.queue = hist("request_queue_time_seconds", "Arrival to admission into a denoising slot.", LATENCY)
        self.steps = hist("denoising_steps_per_canvas", "Refinement passes a canvas took before commit.", STEPS)
        self.tpf = hist("tokens_per_forward", "Committed canvas tokens per denoising pass, per request.", TPF)
        self.pass_time = hist("pass_duration_seconds", "Wall time of one batched denoising pass.", PASS)
        self.batch = hist("pass_batch_size", "Canvases refined together in one pass.", BATCH)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens billed (each distinct prompt once).")
        self.generation_tokens = counter("generation_tokens", "Completion tokens returned to clients.")
        self.positions = counter("canvas_positions_evaluated", "Canvas positions the decoder evaluated.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (not encoded).")
        self._success = Counter(
            "press:request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"],
            registry=r,
        )  # fmt: skip
        self._model = model_name
        self.running = Gauge("press:num_requests_running", "Requests holding a slot.", labels, registry=r)
        self.waiting = Gauge("press:num_requests_waiting", "Requests waiting for a slot.", labels, registry=r)
        self.kv_usage = Gauge(
            "press:kv_cache_usage_perc", "Share of the KV budget the running requests hold (0-1; 0 without a budget).",
            labels, registry=r,
        )  # fmt: skip

    def bind_gauges(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        """The gauges read the scheduler at scrape time, so they are never stale."""
        self.running.labels(self._model).set_function(running)
        self.waiting.labels(self._model).set_function(waiting)

    def bind_kv_usage(self, usage: Callable[[], float]) -> None:
        self.kv_usage.labels(self._model).set_function(usage)

    # ---------------------------------------------------------------- events

    def admitted(self, state: DenoiseState) -> None:
        state.admitted_at = time.monotonic()
        self.queue.observe(state.admitted_at - state.arrived_at)

    def prefix_lookup(self, queried: int, hit: int) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)

    def prefilled(self, state: DenoiseState) -> None:
        if state.bills_prompt:
            self.prompt_tokens.inc(len(state.prompt_ids))

    def batched_pass(self, rows: int, canvas_length: int, seconds: float) -> None:
        self.pass_time.observe(seconds)
        self.batch.observe(rows)
        self.positions.inc(rows * canvas_length)

    def first_pass(self, state: DenoiseState) -> None:
        self.ttfd.observe(time.monotonic() - state.arrived_at)

    def committed(self, state: DenoiseState, passes: int) -> None:
        self.steps.observe(passes)
        if state.canvas_index == 0:
            self.ttft.observe(time.monotonic() - state.arrived_at)

    def finished(self, state: DenoiseState, reason: str, completion_tokens: int) -> None:
        self.e2e.observe(time.monotonic() - state.arrived_at)
        self.generation_tokens.inc(completion_tokens)
        self._success.labels(self._model, reason).inc()
        if state.total_passes:
            self.tpf.observe(state.tokens_per_forward)
