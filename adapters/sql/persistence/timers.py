"""Code-workflow durable timers in the SQL adapter: the ``Timers`` concern of one
``SqlTransaction``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.persistence.shared import SqlUnit
from treadle.kernel.model import (
    evolve,
)
from treadle.kernel.workflows.model import Timer


def _timer_from_row(row: sa.Row[Any]) -> Timer:
    return Timer(
        id=int(row.id),
        workflow_run_id=row.run_id,
        name=row.step_name,
        occurrence=row.occurrence,
        purpose=row.kind,
        fire_at=row.fire_at,
        payload=row.payload,
        created_at=row.created_at,
        fired_at=row.fired_at,
    )


class SqlTimers:
    """Durable timers on this transaction's connection (``tx.timers``)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlUnit) -> None:
        self._tx = tx

    async def schedule(self, timer: Timer) -> Timer:
        c = t.timers.c
        values = {
            "run_id": timer.workflow_run_id,
            "step_name": timer.name,
            "occurrence": timer.occurrence,
            "kind": timer.purpose,
            "fire_at": timer.fire_at,
            "payload": timer.payload,
            "created_at": timer.created_at,
            "fired_at": None,
        }
        replace = {k: values[k] for k in ("kind", "fire_at", "payload", "created_at", "fired_at")}
        stmt = (
            self._tx.dialect.insert(t.timers)
            .values(values)
            .on_conflict_do_update(
                index_elements=[c.run_id, c.step_name, c.occurrence], set_=replace
            )
            .returning(c.id)
        )
        row = (await self._tx.execute(stmt, "schedule timer")).first()
        assert row is not None
        return evolve(timer, {"id": int(row[0]), "fired_at": None})

    async def pending(self, run_id: str) -> list[Timer]:
        c = t.timers.c
        query = (
            sa.select(t.timers)
            .where(c.run_id == run_id, c.fired_at.is_(None))
            .order_by(c.fire_at, c.id)
        )
        return [_timer_from_row(row) for row in await self._tx.execute(query, "pending timers")]

    async def due(self, now: datetime, limit: int, *, purpose: str) -> list[Timer]:
        c = t.timers.c
        query = (
            sa.select(t.timers)
            .where(c.fired_at.is_(None), c.fire_at <= now, c.kind == purpose)
            .order_by(c.fire_at, c.id)
            .limit(limit)
        )
        return [_timer_from_row(row) for row in await self._tx.execute(query, "due timers")]

    async def fire(self, run_id: str, name: str, occurrence: int, fired_at: datetime) -> bool:
        c = t.timers.c
        stmt = (
            sa.update(t.timers)
            .where(
                c.run_id == run_id,
                c.step_name == name,
                c.occurrence == occurrence,
                c.fired_at.is_(None),
            )
            .values(fired_at=fired_at)
        )
        return bool((await self._tx.execute(stmt, "fire timer")).rowcount == 1)
