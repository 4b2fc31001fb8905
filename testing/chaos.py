"""Chaos: inject transient storage failures at commit time, reproducibly by seed.

A failed commit raises ``TransientStorageError`` *after* the transaction body ran,
so the adapter must really roll back: exactly what crash-safety depends on.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from treadle.kernel.errors import TransientStorageError


@dataclass
class Chaos:
    fail_rate: float
    seed: int
    injected: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate < 1.0:
            raise ValueError(f"fail_rate must be within [0, 1), got {self.fail_rate}")
        self._rng = random.Random(self.seed)

    def roll(self) -> bool:
        if self._rng.random() < self.fail_rate:
            self.injected += 1
            return True
        return False

    def wrap(self, persistence: Any) -> ChaosPersistence:
        return ChaosPersistence(persistence, self)


def with_chaos(fail_rate: float, seed: int = 0) -> Chaos:
    """``TestEngine(workflows, chaos=with_chaos(0.1, seed=7))``: ~10% of commits fail."""
    return Chaos(fail_rate=fail_rate, seed=seed)


class ChaosPersistence:
    """Delegates to a Persistence; some commits fail with ``TransientStorageError``."""

    def __init__(self, inner: Any, chaos: Chaos) -> None:
        self.inner = inner
        self.chaos = chaos

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with self.inner.transaction() as tx:
            yield tx
            if self.chaos.roll():
                raise TransientStorageError("chaos: commit failed (injected)")

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
