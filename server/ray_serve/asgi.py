"""Run one HTTP request through an ASGI app in-process and stream its response messages out.

A Ray replica holds Press's FastAPI app and answers the ingress's forwarded requests with it, so the replica
behaves exactly as `press serve` (validation, errors, streaming, usage, disconnects). The response comes back as
messages: first {"status", "headers"}, then {"body": bytes} pieces as the app sends them. If the consumer stops
(the client went away, Ray cancelled the call), the app sees `http.disconnect`, as it would from uvicorn, and
its task is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class ForwardedRequest:
    """What the ingress sends a replica (picklable). `messages` / `prompt`: the routing keys' source, for the
    request router, which reads them from the call's arguments."""

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    affinity: list[str] = field(default_factory=list)  # prefix keys, longest last (server/ray_serve/routing.py)


async def call_app(app, request: ForwardedRequest) -> AsyncIterator[dict]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query,
        "root_path": "",
        "headers": request.headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }
    out: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield {"body": bytes(message["body"])}
                if not message.get("more_body", False):
                    break
        await task
    finally:
        disconnected.set()
        if not task.done():
            try:  # the app notices the disconnect (and cancels its engine request) within a poll or two
                async with asyncio.timeout(2.0):
                    await asyncio.shield(task)
            except asyncio.CancelledError:
                task.cancel()
                raise
            except Exception:  # TimeoutError included; the app's own errors were answered by the app
                task.cancel()
