"""Admission at the Ray ingress: how many requests may be in flight through it at once.

Each replica holds `max_num_seqs + max_queue` requests (its engine's slots and queue) and up to `max_queue` more
wait at the router, so the deployment holds replicas x (max_num_seqs + max_queue) + max_queue. The ingress counts
the requests it has handed on until their answers are fully sent and refuses the next one beyond that (503). Ray
Serve's own `max_queued_requests` is not used for this: Ray counts a request as queued until its router has
assigned it a replica, so in a burst it refused requests bound for free places.
"""

from collections.abc import Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class Ticket:
    """One request's place; `release` gives it back (once, however often it is called). `handed_on` is set when a
    ReleasingResponse has taken it over. A request that takes no place (not a generation) gets `Ticket()`."""

    def __init__(self, on_release: Callable[[], None] = lambda: None) -> None:
        self._on_release = on_release
        self._held = True
        self.handed_on = False

    def release(self) -> None:
        if self._held:
            self._held = False
            self._on_release()


class Admission:
    def __init__(self, per_replica: int, queue: int, replicas: Callable[[], int]) -> None:
        self.per_replica, self.queue, self.replicas = per_replica, queue, replicas
        self.in_flight = 0

    @property
    def capacity(self) -> int:
        return self.replicas() * self.per_replica + self.queue

    def admit(self) -> Ticket | None:
        """A place for one more request, or None when the deployment is full. Called on the ingress's event loop,
        so the check and the count need no lock."""
        if self.in_flight >= self.capacity:
            return None
        self.in_flight += 1
        return Ticket(self._release)

    def _release(self) -> None:
        self.in_flight -= 1


class ReleasingResponse(StreamingResponse):
    """A streamed answer that gives back its request's place once it is sent, cut short or abandoned."""

    def __init__(self, *args, ticket: Ticket, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ticket = ticket
        ticket.handed_on = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()
