"""Which requests take part in the next pass: a waiting queue and a bounded set of denoising slots, admitted
first come first served while their KV caches fit the memory budget (engine/memory_plan.py)."""

from __future__ import annotations

import collections

from engine.memory_plan import KVBudget
from engine.request import DenoiseState, RequestStatus


def context_length(state: DenoiseState) -> int:
    """The longest a request's cache can grow: its prompt and every answer token."""
    return len(state.prompt_ids) + state.params.max_tokens


class Scheduler:
    def __init__(self, max_num_seqs: int, kv_budget: KVBudget | None = None) -> None:
        self.max_num_seqs = max_num_seqs
        self.kv_budget = kv_budget
        self.waiting: collections.deque[DenoiseState] = collections.deque()
        self.running: list[DenoiseState] = []

    def kv_usage(self) -> float:
        """Share of the KV budget the running requests hold, at their longest (0 without a budget)."""
        if self.kv_budget is None:
            return 0.0
        held = self.kv_budget.plan.running_bytes([context_length(s) for s in list(self.running)])
        return held / self.kv_budget.budget

    def add(self, state: DenoiseState) -> None:
        self.waiting.append(state)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[DenoiseState], list[DenoiseState]]:
        """Admit waiting requests into free slots (FIFO) while their caches fit the budget; a request that does not
        fit waits (and those behind it) until running ones finish. Returns (admitted, cancelled-and-dropped)."""
        dropped = [s for s in self.waiting if s.cancelled.is_set()]
        dropped += [s for s in self.running if s.cancelled.is_set()]
        if dropped:
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled.is_set())
            self.running = [s for s in self.running if not s.cancelled.is_set()]
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            if self.running and self.kv_budget is not None:
                lengths = [context_length(s) for s in (*self.running, self.waiting[0])]
                if not self.kv_budget.fits(lengths):
                    break
            state = self.waiting.popleft()
            state.status = RequestStatus.PREFILLING
            self.running.append(state)
            admitted.append(state)
        return admitted, dropped

    def finish(self, state: DenoiseState) -> None:
        state.status = RequestStatus.FINISHED
        if state in self.running:
            self.running.remove(state)
