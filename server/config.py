"""Server settings and the one precedence every setting follows:
CLI flag > PRESS_* environment variable > YAML preset > default."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from engine.config import EngineConfig
from server.images import ImageLimits


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Required on /v1/* as `Authorization: Bearer KEY` or `x-api-key: KEY` when set.
    api_key: str | None = None
    # Also require the key on /metrics (and /health, /ready stay public for probes).
    metrics_require_key: bool = False
    # Comma-separated origins allowed by CORS ("*" for any); empty disables CORS.
    cors_origins: str = ""
    # Largest request body accepted, in bytes (413 beyond).
    max_body_bytes: int = 32 * 1024 * 1024  # room for images sent as data: URLs
    # Seconds a client gets to send its whole request body (408 beyond): a slow or stalled upload is cut.
    body_timeout: float = 30.0
    # Seconds a request may run before it is cancelled (504, or an error event in a stream); 0 = no limit.
    request_timeout: float = 600.0
    # Longest prompt accepted, in tokens; None = only the context length applies.
    max_prompt_tokens: int | None = None
    # Seconds in-flight requests get to finish after SIGTERM before the process exits anyway.
    shutdown_timeout: float = 30.0
    # One JSON line per request on the `press.requests` logger.
    log_requests: bool = True
    log_level: str = "info"
    # The browser playground at GET / (static files in server/playground/).
    playground: bool = True
    # Images in chat messages (image_url parts): how many per request, the largest encoded size and pixel count of
    # one image, whether http(s) URLs are fetched at all, whether hosts on private / loopback / link-local addresses
    # may be fetched from, and the seconds one fetch may take.
    max_images: int = 16
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    image_fetch: bool = True
    image_fetch_private: bool = False
    image_fetch_timeout: float = 10.0

    # Ray Serve (`press serve --ray`, pip install press[ray]): engine replicas behind one ingress. A fixed number of
    # replicas, or autoscaling between min and max (when max is set); CPUs and GPUs per replica (GPUs: 1 on CUDA
    # devices when unset); how many more requests in flight a conversation's replica may have than the least
    # loaded one before the conversation goes elsewhere.
    ray: bool = False
    ray_replicas: int = 1
    ray_min_replicas: int | None = None
    ray_max_replicas: int | None = None
    ray_replica_cpus: float = 1.0
    ray_replica_gpus: float | None = None
    ray_affinity_imbalance: int = 4

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_images=self.max_images, max_bytes=self.max_image_bytes,
                           max_pixels=self.max_image_pixels, fetch=self.image_fetch,
                           fetch_private=self.image_fetch_private, fetch_timeout=self.image_fetch_timeout)  # fmt: skip


@dataclass
class Settings:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def _parse(name: str, value: str, kind: str) -> object:
    kind = kind.replace(" ", "")
    if kind.startswith("bool"):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise SystemExit(f"PRESS_{name.upper()}: expected true or false, got {value!r}")
        return value.lower() in ("1", "true", "yes", "on")
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except ValueError:
        raise SystemExit(f"PRESS_{name.upper()}: expected a number, got {value!r}") from None
    return value


def load_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    preset: dict = {}
    config_path = getattr(args, "config", None) or environ.get("PRESS_CONFIG")
    if config_path:
        import yaml

        with open(config_path) as f:
            preset = yaml.safe_load(f) or {}
        known = {f.name for f in fields(EngineConfig)} | {f.name for f in fields(ServerConfig)}
        unknown = sorted(set(preset) - known)
        if unknown:
            raise SystemExit(f"{config_path}: unknown settings {', '.join(unknown)}")
    built = []
    for cls in (EngineConfig, ServerConfig):
        values: dict = {}
        for f in fields(cls):
            if f.name in preset:
                values[f.name] = preset[f.name]
            env = environ.get(f"PRESS_{f.name.upper()}")
            if env is not None:
                values[f.name] = _parse(f.name, env, str(f.type))
            flag = getattr(args, f.name, None)
            if flag is not None:
                values[f.name] = flag
        built.append(cls(**values))
    return Settings(engine=built[0], server=built[1])
