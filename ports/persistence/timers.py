"""The timers concern of the Persistence port: a code workflow's durable timers
(sleeps, waits with a timeout, execution timeouts)."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from treadle.kernel.workflows.model import Timer


class TimerStore(Protocol):
    """A code workflow's durable timers (``tx.timers``)."""

    async def schedule(self, timer: Timer) -> Timer:
        """Insert or replace the timer of (run, name, occurrence), live (unfired); returns
        it with its ``id``."""

    async def pending(self, run_id: str) -> list[Timer]:
        """The run's unfired timers, earliest ``fire_at`` first."""

    async def fire(self, run_id: str, name: str, occurrence: int, fired_at: datetime) -> bool:
        """Mark the live timer of (run, name, occurrence) fired; ``False`` if none is live."""

    async def due(self, now: datetime, limit: int, *, purpose: str) -> list[Timer]:
        """Unfired timers of ``purpose`` due at ``now`` across all runs, earliest first
        (execution timeouts, which fire whatever state the run is in)."""
