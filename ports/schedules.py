"""The ScheduleStore port: durable cron schedules, reached as ``tx.schedules``.

A narrow store of its own rather than more methods on ``Transaction``: it shares the
transaction's unit of work (a fire commits the schedule's new state with the run it
starts) but nothing else.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Protocol

from treadle.kernel.schedules import Schedule


class ScheduleStore(Protocol):
    async def insert(self, schedule: Schedule) -> None:
        """Insert a new schedule; ``DuplicateError`` if its id exists."""

    async def get(self, schedule_id: str, *, for_update: bool = False) -> Schedule | None:
        """The schedule; ``for_update`` locks its row until commit where supported, so two
        ticks firing it take turns (the second sees the first's ``next_fire_at``)."""

    async def update(self, schedule: Schedule) -> Schedule:
        """Store it if the stored version equals ``schedule.version``; returns it with
        the version bumped. ``ConcurrencyError`` when someone else updated it first."""

    async def delete(self, schedule_id: str) -> bool:
        """Remove it; ``False`` if there was none."""

    async def list(
        self, *, workflow_id: str | None = None, paused: bool | None = None, limit: int = 1000
    ) -> builtins.list[Schedule]:
        """Schedules by id, optionally of one workflow or only (un)paused ones."""

    async def due(self, now: datetime, limit: int) -> builtins.list[Schedule]:
        """Unpaused schedules whose ``next_fire_at`` is at or before ``now``, earliest
        first (not locked: the firing handler locks each one it fires)."""

    async def next_fire_at(self) -> datetime | None:
        """The earliest ``next_fire_at`` of the unpaused schedules (a worker sleeps until
        it)."""
