"""Which requests take part in the next pass: a waiting queue and a bounded set of denoising slots."""

from __future__ import annotations

import collections

from engine.request import DenoiseState, RequestStatus


class Scheduler:
    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.waiting: collections.deque[DenoiseState] = collections.deque()
        self.running: list[DenoiseState] = []

    def add(self, state: DenoiseState) -> None:
        self.waiting.append(state)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[DenoiseState], list[DenoiseState]]:
        """Admit waiting requests into free slots (FIFO). Returns (admitted, cancelled-and-dropped)."""
        dropped = [s for s in self.waiting if s.cancelled.is_set()]
        dropped += [s for s in self.running if s.cancelled.is_set()]
        if dropped:
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled.is_set())
            self.running = [s for s in self.running if not s.cancelled.is_set()]
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            state = self.waiting.popleft()
            state.status = RequestStatus.PREFILLING
            self.running.append(state)
            admitted.append(state)
        return admitted, dropped

    def finish(self, state: DenoiseState) -> None:
        state.status = RequestStatus.FINISHED
        if state in self.running:
            self.running.remove(state)
