"""Run uvicorn with a graceful drain: on SIGTERM (or Ctrl-C) new /v1 requests get 503, requests in flight
(streams included) get up to `shutdown_timeout` seconds to finish, then the process exits with status 0.
A second signal stops waiting."""

from __future__ import annotations

import logging
import signal
import time

import uvicorn
from fastapi import FastAPI

from server.config import ServerConfig

log = logging.getLogger("press.server")
# Seconds the requests cut at the shutdown timeout get to send their error before the process exits.
CUT_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.press_state = app.state.server_state
        self.shutdown_timeout = shutdown_timeout
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the process would
        # die by the signal instead of exiting 0 after a clean drain.
        if self.drain_started is not None:
            self.should_exit = True
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        log.info("signal %s: draining %d request(s) for up to %.0f s", sig, self.press_state.inflight,
                 self.shutdown_timeout)  # fmt: skip
        self.press_state.draining = True
        self.drain_started = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if self.press_state.inflight == 0:
                self.should_exit = True
            elif waited >= self.shutdown_timeout and not self.press_state.cutting:
                # Tell the requests still running, so each client gets a 503 instead of a dropped connection,
                # and give them CUT_GRACE_S to send it.
                log.warning("shutdown timeout: cancelling %d request(s)", self.press_state.inflight)
                self.press_state.cutting = True
            elif waited >= self.shutdown_timeout + CUT_GRACE_S:
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(app: FastAPI, config: ServerConfig) -> None:
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=1,  # the drain above already waited; cut stragglers quickly
    )
    DrainingServer(uv_config, app, config.shutdown_timeout).run()
