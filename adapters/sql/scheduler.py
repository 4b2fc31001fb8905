"""SQL Scheduler: commands scheduled for later, in the ``scheduled_commands`` table.

Timers survive restarts and are shared by every worker on the database: any
process's maintenance tick drains the due ones, and a worker that knows the
earliest ``run_at`` wakes then (``schedule`` notes it as a due time, see
``adapters/due_times.py``). ``due`` removes what it returns in
the same short transaction (on PostgreSQL with ``FOR UPDATE SKIP LOCKED``), so two
ticks never hand out the same command; as with the in-memory scheduler, a command
is handed over once and the caller dispatches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.persistence import SqlPersistence


class SqlScheduler:
    """The Scheduler port on the database behind ``persistence``."""

    def __init__(self, persistence: SqlPersistence) -> None:
        self.persistence = persistence

    async def schedule(self, key: str, command: Mapping[str, Any], run_at: datetime) -> None:
        if "type" not in command:
            raise ValueError(f"scheduled command {key!r} has no 'type'")
        values = {"key": key, "command": dict(command), "run_at": run_at}
        async with self.persistence.transaction() as tx:
            stmt = (
                tx.dialect.insert(t.scheduled_commands)
                .values(values)
                .on_conflict_do_update(
                    index_elements=["key"],
                    set_={"command": values["command"], "run_at": run_at},
                )
            )
            await tx.execute(stmt, f"schedule {key!r}")
            tx.note_due("command", run_at)  # workers wake at run_at, not at their next tick

    async def cancel(self, key: str) -> bool:
        table = t.scheduled_commands
        async with self.persistence.transaction() as tx:
            result = await tx.execute(sa.delete(table).where(table.c.key == key), "cancel")
            return bool(result.rowcount)

    async def due(self, now: datetime, *, limit: int = 100) -> list[Mapping[str, Any]]:
        if limit <= 0:
            return []
        c = t.scheduled_commands.c
        query = (
            sa.select(c.key, c.command)
            .where(c.run_at <= now)
            .order_by(c.run_at, c.key)
            .limit(limit)
        )
        async with self.persistence.transaction() as tx:
            query = tx.dialect.lock(query, skip_locked=True)
            rows = (await tx.execute(query, "due scheduled commands")).all()
            if rows:
                keys = [row.key for row in rows]
                await tx.execute(
                    sa.delete(t.scheduled_commands).where(c.key.in_(keys)),
                    "take scheduled commands",
                )
        return [dict(row.command) for row in rows]

    async def next_due_at(self) -> datetime | None:
        query = sa.select(sa.func.min(t.scheduled_commands.c.run_at))
        async with self.persistence.transaction(read_only=True) as tx:
            value: datetime | None = (
                await tx.execute(query, "next scheduled")
            ).scalar_one_or_none()
        return value
