"""Fault injection, for the tests of failure handling: `PRESS_FAULT_INJECT=pass:N[,M...]` makes the engine's Nth
(and Mth...) decoder pass since start raise, as a failing kernel or an out-of-memory error would. Unset (always,
outside those tests) it does nothing."""

from __future__ import annotations

import os


class FaultInjector:
    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("PRESS_FAULT_INJECT", "") if spec is None else spec
        kind, _, numbers = spec.partition(":")
        self.passes = {int(n) for n in numbers.split(",") if n.strip()} if kind == "pass" else set()
        self.count = 0

    def before_pass(self) -> None:
        if not self.passes:
            return
        self.count += 1
        if self.count in self.passes:
            raise RuntimeError(f"injected fault at pass {self.count} (PRESS_FAULT_INJECT)")
