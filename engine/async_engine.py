"""Runs `LLMEngine` on its own thread and hands each request's events to asyncio consumers.

HTTP handlers never wait on a forward pass: they `await` an asyncio.Queue that the engine thread fills
with `loop.call_soon_threadsafe`. Cancelling the consuming task (a client that disconnected) marks the
request cancelled; the engine drops it at the next pass boundary.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.events import Event, FinishEvent
from engine.request import DenoiseState

log = logging.getLogger("press.engine")


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: list[tuple[DenoiseState, asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="press-engine", daemon=True)
        engine.metrics.bind_gauges(lambda: self.num_running, lambda: self.num_waiting)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    # ------------------------------------------------------------- asyncio side

    async def generate(self, state: DenoiseState) -> AsyncIterator[Event]:
        """Submit a validated request and yield its events until the FinishEvent."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        with self._wake:
            if self._stopping:
                raise RuntimeError("engine is shutting down")
            self._inbox.append((state, loop, queue))
            self._wake.notify()
        finished = False
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, FinishEvent):
                    finished = True
                    return
        finally:
            if not finished:
                state.cancelled.set()
                with self._wake:
                    self._wake.notify()

    @property
    def alive(self) -> bool:
        """Whether the engine thread is still running."""
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._inbox)

    # -------------------------------------------------------------- engine side

    def _emit(self, state: DenoiseState, event: Event) -> None:
        sink = self._sinks.get(state.request_id)
        if sink is None:
            return
        loop, queue = sink
        if isinstance(event, FinishEvent):
            del self._sinks[state.request_id]
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop is closed; nobody is listening any more
            state.cancelled.set()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopping:
                    return
                arrivals, self._inbox = self._inbox, []
            for state, loop, queue in arrivals:
                self._sinks[state.request_id] = (loop, queue)
                self.engine.add_request(state)
            try:
                self.engine.step(self._emit)
            except Exception:  # keep serving: the step already failed the affected requests
                log.exception("engine step failed")
