"""``SqlScheduleStore``: the ScheduleStore port on the ``schedules`` table.

It runs on its transaction's connection (``tx.schedules``), so a fire commits the
schedule's next fire time with the runs it starts. ``get(for_update=True)`` takes the
row lock on PostgreSQL (SQLite's ``BEGIN IMMEDIATE`` already serialises writers): two
ticks firing one schedule take turns. A write that sets a ``next_fire_at`` notes it as
due time kind ``schedule`` (``adapters/due_times.py``), so workers sleep until it.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa

from treadle.adapters.due_times import DueKind, as_utc
from treadle.adapters.sql import schema as t
from treadle.kernel.errors import ConcurrencyError
from treadle.kernel.model import evolve
from treadle.kernel.schedules import Schedule


class SqlUnitOfWork(Protocol):
    """What the store needs of ``SqlTransaction`` (named by this Protocol, so the
    transaction's module and this one do not import each other)."""

    @property
    def is_postgres(self) -> bool: ...

    async def execute(
        self, statement: sa.Executable, what: str = ..., parameters: Any = ...
    ) -> Any: ...

    def note_due(self, kind: DueKind, when: datetime) -> None: ...


def _row(schedule: Schedule) -> dict[str, Any]:
    return {
        "id": schedule.id,
        "workflow_id": schedule.workflow_id,
        "paused": schedule.paused,
        "next_fire_at": schedule.next_fire_at,
        "version": schedule.version,
        "data": schedule.model_dump(mode="json"),
    }


def _schedule(row: Any) -> Schedule:
    return Schedule.model_validate({**row.data, "version": row.version})


class SqlScheduleStore:
    def __init__(self, tx: SqlUnitOfWork) -> None:
        self._tx = tx

    def _note(self, schedule: Schedule) -> None:
        if not schedule.paused and schedule.next_fire_at is not None:
            self._tx.note_due("schedule", as_utc(schedule.next_fire_at))

    async def insert(self, schedule: Schedule) -> None:
        await self._tx.execute(t.schedules.insert().values(**_row(schedule)), "insert schedule")
        self._note(schedule)

    async def get(self, schedule_id: str, *, for_update: bool = False) -> Schedule | None:
        query = sa.select(t.schedules).where(t.schedules.c.id == schedule_id)
        if for_update and self._tx.is_postgres:
            query = query.with_for_update()
        row = (await self._tx.execute(query, "get schedule")).first()
        return _schedule(row) if row is not None else None

    async def update(self, schedule: Schedule) -> Schedule:
        new = evolve(schedule, {"version": schedule.version + 1})
        values = _row(new)
        del values["id"]
        statement = (
            t.schedules.update()
            .where(t.schedules.c.id == schedule.id, t.schedules.c.version == schedule.version)
            .values(**values)
        )
        result = await self._tx.execute(statement, "update schedule")
        if result.rowcount != 1:
            raise ConcurrencyError(f"schedule {schedule.id!r} was changed or deleted meanwhile")
        self._note(new)
        return new

    async def delete(self, schedule_id: str) -> bool:
        statement = t.schedules.delete().where(t.schedules.c.id == schedule_id)
        result = await self._tx.execute(statement, "delete schedule")
        return bool(result.rowcount)

    async def list(
        self, *, workflow_id: str | None = None, paused: bool | None = None, limit: int = 1000
    ) -> builtins.list[Schedule]:
        query = sa.select(t.schedules).order_by(t.schedules.c.id).limit(limit)
        if workflow_id is not None:
            query = query.where(t.schedules.c.workflow_id == workflow_id)
        if paused is not None:
            query = query.where(t.schedules.c.paused == paused)
        rows = (await self._tx.execute(query, "list schedules")).all()
        return [_schedule(row) for row in rows]

    async def due(self, now: datetime, limit: int) -> builtins.list[Schedule]:
        query = (
            sa.select(t.schedules)
            .where(
                t.schedules.c.paused == sa.false(),
                t.schedules.c.next_fire_at.is_not(None),
                t.schedules.c.next_fire_at <= now,
            )
            .order_by(t.schedules.c.next_fire_at, t.schedules.c.id)
            .limit(limit)
        )
        rows = (await self._tx.execute(query, "due schedules")).all()
        return [_schedule(row) for row in rows]

    async def next_fire_at(self) -> datetime | None:
        query = sa.select(sa.func.min(t.schedules.c.next_fire_at)).where(
            t.schedules.c.paused == sa.false()
        )
        value = (await self._tx.execute(query, "next schedule fire")).scalar()
        return as_utc(value) if value is not None else None
