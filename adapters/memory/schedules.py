"""``InMemoryScheduleStore``: the ScheduleStore port over a dict, in a memory transaction.

Writes go through the transaction's undo log (``set_item``/``del_item``), so a rolled
back fire leaves the schedule as it was, as on the SQL adapters.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any, Protocol

from treadle.kernel.errors import ConcurrencyError, DuplicateError
from treadle.kernel.model import evolve
from treadle.kernel.schedules import Schedule


class UndoLog(Protocol):
    """What the store needs of ``InMemoryTransaction``: writes it can roll back (named
    by this Protocol, so the transaction's module and this one do not import each other)."""

    def set_item(self, mapping: dict[Any, Any], key: Any, value: Any) -> None: ...

    def del_item(self, mapping: dict[Any, Any], key: Any) -> None: ...


class InMemoryScheduleStore:
    def __init__(self, tx: UndoLog, rows: dict[str, Schedule]) -> None:
        self._tx = tx
        self._rows = rows

    async def insert(self, schedule: Schedule) -> None:
        if schedule.id in self._rows:
            raise DuplicateError(f"schedule {schedule.id!r} already exists")
        self._tx.set_item(self._rows, schedule.id, schedule)

    async def get(self, schedule_id: str, *, for_update: bool = False) -> Schedule | None:
        return self._rows.get(schedule_id)

    async def update(self, schedule: Schedule) -> Schedule:
        stored = self._rows.get(schedule.id)
        if stored is None or stored.version != schedule.version:
            raise ConcurrencyError(f"schedule {schedule.id!r} was changed or deleted meanwhile")
        new = evolve(schedule, {"version": schedule.version + 1})
        self._tx.set_item(self._rows, schedule.id, new)
        return new

    async def delete(self, schedule_id: str) -> bool:
        if schedule_id not in self._rows:
            return False
        self._tx.del_item(self._rows, schedule_id)
        return True

    async def list(
        self, *, workflow_id: str | None = None, paused: bool | None = None, limit: int = 1000
    ) -> builtins.list[Schedule]:
        found = [
            s
            for _, s in sorted(self._rows.items())
            if (workflow_id is None or s.workflow_id == workflow_id)
            and (paused is None or s.paused == paused)
        ]
        return found[:limit]

    async def due(self, now: datetime, limit: int) -> builtins.list[Schedule]:
        found = [
            s
            for s in self._rows.values()
            if not s.paused and s.next_fire_at is not None and s.next_fire_at <= now
        ]
        found.sort(key=lambda s: (s.next_fire_at, s.id))
        return found[:limit]

    async def next_fire_at(self) -> datetime | None:
        return min(
            (s.next_fire_at for s in self._rows.values() if not s.paused and s.next_fire_at),
            default=None,
        )
