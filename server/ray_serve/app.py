"""The Ray Serve application: engine replicas behind one OpenAI HTTP ingress.

- `PressReplica` (N replicas, one GPU each on CUDA): Press's own FastAPI app with its engine, answering requests the
  ingress forwards (server/ray_serve/asgi.py), so every endpoint behaves exactly as `press serve`. Its response
  headers name it (`x-press-replica`). It reports its load and its Prometheus metrics to a small store actor every
  half second; Ray restarts it when its health check fails (the engine thread stopped).
- `PressIngress` (one): the HTTP entry. It reads the request once to compute its prefix-affinity keys, hands it
  to a replica through the `PrefixAffinityRouter`, and streams the answer back. A replica that dies before any of
  the answer was sent is retried on another one; one that dies mid-stream ends the stream with an error event.
  It admits as many generations as the replicas and one router queue hold (server/ray_serve/admission.py) and
  answers 503 beyond. `/health` sums the replicas' load, `/ready` asks a replica, `/metrics` merges every
  replica's metrics (label `replica`), `/replicas` lists them.
- Autoscaling uses Ray Serve's ongoing-request count per replica, which for Press is exactly the engine's running
  plus waiting requests (each request in flight is one or the other), with `max_num_seqs` as the target.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from engine.config import EngineConfig
from server.config import ServerConfig, Settings
from server.errors import APIError, body_too_large, install_error_handlers
from server.middleware import check_api_key
from server.ray_serve.admission import Admission, ReleasingResponse, Ticket
from server.ray_serve.asgi import ForwardedRequest, call_app
from server.ray_serve.routing import affinity_keys

log = logging.getLogger("press.ray")

APP_NAME = "press"
METRICS_PUSH_S = 0.5  # how often a replica reports its load and metrics
REPLICA_STALE_S = 10.0  # a replica silent this long is left out of /health and /metrics
RETRIES = 3  # replicas tried for a request whose answer has not started
# Not passed on from a replica's answer: hop-by-hop headers, and the request id Ray Serve's proxy sets itself (the
# replica echoes the same id).
HOP_BY_HOP = {b"connection", b"transfer-encoding", b"keep-alive", b"x-request-id"}
RETRYABLE = (RayActorError, ActorUnavailableError)


def settings_to_dict(settings: Settings) -> dict:
    return {"engine": dataclasses.asdict(settings.engine), "server": dataclasses.asdict(settings.server)}


def settings_from_dict(data: dict) -> Settings:
    return Settings(engine=EngineConfig(**data["engine"]), server=ServerConfig(**data["server"]))


@ray.remote(num_cpus=0)
class MetricsStore:
    """The replicas' latest reports (pid, load, Prometheus text), by replica id."""

    def __init__(self) -> None:
        self.reports: dict[str, dict] = {}

    def put(self, replica: str, report: dict) -> None:
        self.reports[replica] = {**report, "at": time.time()}

    def get(self) -> dict[str, dict]:
        now = time.time()
        return {k: v for k, v in self.reports.items() if now - v["at"] < REPLICA_STALE_S}


def _store(name: str):
    return MetricsStore.options(name=name, namespace="press", get_if_exists=True, lifetime="detached").remote()


async def _next_body(stream) -> bytes | None:
    try:
        return (await stream.__anext__())["body"]
    except StopAsyncIteration:
        return None


def _stream_response(start: dict, first: bytes | None, stream, counts: dict, ticket: Ticket) -> Response:
    headers = [(k, v) for k, v in start["headers"] if k.lower() not in HOP_BY_HOP]
    event_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

    async def body():
        finished = False
        try:
            if first is not None:
                yield first
                async for message in stream:
                    yield message["body"]
            finished = True
        except RETRYABLE as exc:  # the replica died mid-answer: say so in the stream's own terms
            log.warning("replica died while streaming: %s", exc)
            counts["broken_streams"] += 1
            if event_stream:
                error = APIError(502, "The replica serving this request stopped; the answer is incomplete.",
                                 type="server_error", code="replica_died")  # fmt: skip
                yield b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                stream.cancel()

    response = ReleasingResponse(body(), status_code=start["status"], ticket=ticket)
    response.raw_headers = headers
    return response


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Every replica's Prometheus text as one exposition, each sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "replica": replica}))

    class Collector:
        def collect(self):
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)


class PressReplica:
    async def __init__(self, settings: dict, store_name: str) -> None:
        from server.app import create_app

        self.app = create_app(settings_from_dict(settings))
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        holder = self.app.state.holder
        while holder.serving is None and holder.error is None:
            await asyncio.sleep(0.05)
        if holder.error is not None:
            raise RuntimeError(f"the model failed to load: {holder.error}")
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.store = _store(store_name)
        self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        while True:
            try:
                engine = self.app.state.holder.serving.engine
                report = {"pid": os.getpid(), "running": engine.num_running, "waiting": engine.num_waiting,
                          "metrics": generate_latest(engine.engine.metrics.registry).decode()}  # fmt: skip
                await self.store.put.remote(self.replica_id, report)
            except Exception:
                log.exception("replica %s could not report its metrics", self.replica_id)
            await asyncio.sleep(METRICS_PUSH_S)

    async def handle(self, request: ForwardedRequest):
        """The app's answer to one forwarded request: {"status", "headers"}, then {"body"} pieces."""
        async for message in call_app(self.app, request):
            if "status" in message:
                message["headers"] = [*message["headers"], (b"x-press-replica", self.replica_id.encode())]
            yield message

    def __del__(self) -> None:  # Ray Serve's replica shutdown: stop the engine thread
        app = getattr(self, "app", None)  # absent when the constructor failed
        if app is not None:
            app.state.holder.shutdown()

    def check_health(self) -> None:
        serving = self.app.state.holder.serving
        if serving is None or not serving.engine.alive:
            raise RuntimeError("the engine thread has stopped")


ingress_app = FastAPI(title="Press on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(ingress_app)


@serve.ingress(ingress_app)
class PressIngress:
    def __init__(self, replicas, settings: dict, store_name: str) -> None:
        self.replicas = replicas.options(stream=True)
        self.settings = settings_from_dict(settings)
        self.store = _store(store_name)
        self.counts = {"retried": 0, "broken_streams": 0}  # replica failures this ingress absorbed or reported
        engine, server = self.settings.engine, self.settings.server
        # A fixed deployment holds its configured replicas; an autoscaled one those reporting (at least its minimum).
        self.autoscaled = server.ray_max_replicas is not None
        self.min_replicas = server.ray_min_replicas if server.ray_min_replicas is not None else 1
        self.live_replicas, self.live_at = 0, 0.0
        self.admission = Admission(engine.max_num_seqs + engine.max_queue, engine.max_queue, self._replica_count)

    def _replica_count(self) -> int:
        return max(self.live_replicas, self.min_replicas) if self.autoscaled else self.settings.server.ray_replicas

    async def _refresh_replicas(self) -> None:
        """An autoscaled deployment's reporting replicas, asked of the store at most every METRICS_PUSH_S."""
        if self.autoscaled and time.monotonic() - self.live_at > METRICS_PUSH_S:
            self._note_replicas(await self.store.get.remote())

    def _note_replicas(self, reports: dict) -> None:
        self.live_replicas, self.live_at = len(reports), time.monotonic()

    def _require_metrics_key(self, request: Request) -> None:
        """/metrics and /replicas need the API key when press serve's /metrics would (metrics_require_key)."""
        if self.settings.server.metrics_require_key:
            check_api_key(request.headers, self.settings.server.api_key)

    @ingress_app.get("/health")
    async def health(self) -> dict:
        reports = await self.store.get.remote()
        self._note_replicas(reports)
        return {"status": "ok" if reports else "no_replicas", "replicas": len(reports),
                "running": sum(r["running"] for r in reports.values()),
                "waiting": sum(r["waiting"] for r in reports.values()),
                "in_flight": self.admission.in_flight, "capacity": self.admission.capacity,
                "retried_requests": self.counts["retried"],
                "broken_streams": self.counts["broken_streams"]}  # fmt: skip

    @ingress_app.get("/replicas")
    async def replicas(self, request: Request):
        self._require_metrics_key(request)
        reports = await self.store.get.remote()
        now = time.time()
        return {"data": [{"id": k, "pid": r["pid"], "running": r["running"], "waiting": r["waiting"],
                          "reported_s_ago": round(now - r["at"], 2)} for k, r in sorted(reports.items())]}  # fmt: skip

    @ingress_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self._require_metrics_key(request)
        reports = await self.store.get.remote()
        return Response(merge_metrics({k: r["metrics"] for k, r in reports.items()}), media_type=CONTENT_TYPE_LATEST)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    async def forward(self, path: str, request: Request) -> Response:
        # The replica enforces its limits again (and the body timeout); the ingress only refuses to buffer more.
        limit = self.settings.server.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return body_too_large(limit, length).response()
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                return body_too_large(limit).response()
        body = bytes(body)
        parsed = None
        if body and request.method == "POST":
            with contextlib.suppress(ValueError):
                parsed = json.loads(body)
        forwarded = ForwardedRequest(
            method=request.method, path="/" + path, query=request.url.query.encode(),
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()], body=body,
            affinity=affinity_keys(parsed) if isinstance(parsed, dict) else [],
        )  # fmt: skip
        # Generations (every POST) take a place; /ready, /v1/models and the like never wait or get refused.
        ticket: Ticket | None = Ticket()
        if request.method == "POST":
            await self._refresh_replicas()
            ticket = self.admission.admit()
        if ticket is None:
            return APIError(503, "The server is overloaded: every replica's queue is full. Retry shortly.",
                            type="server_error", code="server_overloaded",
                            headers={"Retry-After": "1"}).response()  # fmt: skip
        try:
            return await self._answer(forwarded, ticket)
        finally:  # a streamed answer has taken the ticket and gives it back once sent; anything else ends here
            if not ticket.handed_on:
                ticket.release()

    async def _answer(self, forwarded: ForwardedRequest, ticket: Ticket) -> Response:
        last_error: BaseException | None = None
        for attempt in range(RETRIES):
            stream = self.replicas.handle.remote(forwarded)
            try:
                start = await stream.__anext__()
                first = await _next_body(stream)
            except RETRYABLE as exc:  # the replica died before anything was sent: another one answers
                log.warning("replica failed before answering (attempt %d): %s", attempt + 1, exc)
                last_error = exc
                self.counts["retried"] += 1
                stream.cancel()
                continue
            except asyncio.CancelledError:  # the client went away
                stream.cancel()
                raise
            return _stream_response(start, first, stream, self.counts, ticket)
        return APIError(503, f"No replica could answer the request ({type(last_error).__name__}). Retry shortly.",
                        type="server_error", code="replica_unavailable",
                        headers={"Retry-After": "1"}).response()  # fmt: skip


# ------------------------------------------------------------------------------------------------- building


def build(settings: Settings) -> serve.Application:
    """The application for `serve.run`: replicas as settings.server.ray_* say, and the ingress."""
    server, engine = settings.server, settings.engine
    store_name = f"press-metrics-{APP_NAME}"
    gpus = server.ray_replica_gpus
    if gpus is None:
        gpus = 1.0 if engine.device.startswith("cuda") else 0.0
    options: dict = {
        "name": "PressReplica",
        "ray_actor_options": {"num_cpus": server.ray_replica_cpus, "num_gpus": gpus},
        # Each replica takes what its engine takes (running + waiting); more waits at the router, as many as the
        # ingress admits (server/ray_serve/admission.py).
        "max_ongoing_requests": engine.max_num_seqs + engine.max_queue,
        "request_router_config": {
            "request_router_class": "server.ray_serve.router:PrefixAffinityRouter",
            "request_router_kwargs": {"imbalance": server.ray_affinity_imbalance},
        },
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": server.shutdown_timeout,
    }
    if server.ray_max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": server.ray_min_replicas if server.ray_min_replicas is not None else 1,
            "max_replicas": server.ray_max_replicas,
            "target_ongoing_requests": engine.max_num_seqs,
            "upscale_delay_s": 5,
            "downscale_delay_s": 60,
        }
    else:
        options["num_replicas"] = server.ray_replicas
    data = settings_to_dict(settings)
    replicas = serve.deployment(PressReplica).options(**options).bind(data, store_name)
    ingress = serve.deployment(PressIngress).options(
        name="PressIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
    )  # fmt: skip
    return ingress.bind(replicas, data, store_name)


def app_builder(args: dict) -> serve.Application:
    """For Ray's own `serve run` (configs/ray/serve.yaml): `args` are `press serve`'s settings by name (a `config`
    preset path among them), over PRESS_* variables, over the preset."""
    import argparse

    from server.config import load_settings

    return build(load_settings(argparse.Namespace(**args)))


def serve_forever(settings: Settings) -> None:
    """`press serve --ray`: join the Ray cluster at RAY_ADDRESS (or start a local one), run the application on
    settings.server.host:port, and stay until SIGTERM or SIGINT."""
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, namespace="press",
             logging_level=settings.server.log_level.upper())  # fmt: skip
    serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
    serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("press on Ray Serve: http://%s:%d", settings.server.host, settings.server.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
