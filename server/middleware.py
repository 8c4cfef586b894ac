"""ASGI middleware: request ids, the JSON request log, body limits, in-flight tracking and draining.

Written as plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and "in
flight" lasts until the last SSE event has been sent.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid

from server.config import ServerConfig
from server.errors import APIError, body_too_large

request_log = logging.getLogger("press.requests")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ServerState:
    """What the middleware and the shutdown logic share."""

    def __init__(self) -> None:
        self.inflight = 0
        self.draining = False
        # Set when the shutdown timeout runs out: requests still running end with a 503 `shutting_down` (a
        # response, or a stream's last event before [DONE]) instead of a dropped connection.
        self.cutting = False


class RequestContext:
    def __init__(self, app, config: ServerConfig, state: ServerState) -> None:
        self.app = app
        self.config = config
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["log"] = {}
        api = scope["path"].startswith("/v1/")
        started = time.monotonic()
        status = {"code": 0}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        async def reject(error: APIError) -> None:
            response = error.response()
            await response(scope, receive, send_with_id)

        if api and self.state.draining:
            await reject(APIError(503, "The server is shutting down; retry on another instance.",
                                  type="server_error", code="shutting_down", headers={"Retry-After": "1"}))  # fmt: skip
            self._log(scope, request_id, status["code"], started)
            return
        limit = self.config.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await reject(body_too_large(limit, length))
            self._log(scope, request_id, status["code"], started)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            # Read the whole body first (it is small: requests are JSON) so an oversized chunked upload is
            # refused with a 413 before any handler sees it, then replay it to the app.
            # A client that sends its body slowly or never finishes it is cut at body_timeout (a 408), so it can
            # hold a connection only that long and never reaches the engine.
            body, more = b"", True
            deadline = time.monotonic() + self.config.body_timeout
            while more:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        message = await receive()
                except TimeoutError:
                    seconds = self.config.body_timeout
                    await reject(APIError(408, f"The request body did not arrive within {seconds:g} s.",
                                          code="body_timeout"))  # fmt: skip
                    self._log(scope, request_id, status["code"], started)
                    return
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    await reject(body_too_large(limit))
                    self._log(scope, request_id, status["code"], started)
                    return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            app_receive = replay
        else:
            app_receive = receive

        if api:
            self.state.inflight += 1
        try:
            await self.app(scope, app_receive, send_with_id)
        finally:
            if api:
                self.state.inflight -= 1
            if api or status["code"] >= 400:
                self._log(scope, request_id, status["code"], started)

    def _log(self, scope, request_id: str, status: int, started: float) -> None:
        if not self.config.log_requests:
            return
        line = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "latency_s": round(time.monotonic() - started, 4),
            **scope.get("state", {}).get("log", {}),
        }
        request_log.info(json.dumps(line, separators=(",", ":")))


def check_api_key(headers, key: str | None) -> None:
    """401 unless the request carries `key` (as `Authorization: Bearer KEY` or `x-api-key: KEY`); no key, no check."""
    if not key:
        return
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "Invalid or missing API key. Send 'Authorization: Bearer <key>' or 'x-api-key'.",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
