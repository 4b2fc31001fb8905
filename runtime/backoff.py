"""Capped exponential delays, for loops that retry while storage is down."""

from __future__ import annotations


class Backoff:
    """Capped exponential delays: ``initial``, doubling, never above ``cap``."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = max(cap, initial)
        self.failures = 0

    def next(self) -> float:
        delay = min(self.cap, self.initial * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
