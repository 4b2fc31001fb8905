"""SQL FlowControl: PostgreSQL advisory transaction locks per key, and counts over
``runs`` (indexes ``ix_runs_flow`` and ``ix_runs_workflow_id_started_at``).

On PostgreSQL a claimer takes ``pg_advisory_xact_lock`` on each key before counting, so
a second claimer of the same key waits until the first commits and then counts the runs
it started (each statement of a READ COMMITTED transaction sees what committed before
it began). SQLite's ``BEGIN IMMEDIATE`` already admits one writer at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.kernel.flow_control import FlowKey, Usage, keys_of_run, tally
from treadle.kernel.model import RunStatus


class Statements(Protocol):
    """What this concern uses of a ``SqlTransaction`` (which imports this module)."""

    @property
    def is_postgres(self) -> bool: ...

    async def execute(self, statement: Any, what: str = ..., parameters: Any = None) -> Any: ...


_HOLDING = (RunStatus.RUNNING.value, RunStatus.SUSPENDED.value)
_LOCK = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


def _lock_name(key: FlowKey) -> str:
    # Ids and keys are control-character free text, so the unit separator cannot occur in
    # them (PostgreSQL text takes no NUL); "*" marks the whole workflow, "=" one key.
    return f"treadle.flow\x1f{key[0]}\x1f" + ("*" if key[1] is None else f"={key[1]}")


class SqlFlowControl:
    def __init__(self, tx: Statements) -> None:
        self.tx = tx

    async def lock(self, keys: Sequence[FlowKey]) -> None:
        if not self.tx.is_postgres:
            return
        for key in keys:
            await self.tx.execute(_LOCK, "lock flow key", {"key": _lock_name(key)})

    async def usage(
        self, keys: Sequence[FlowKey], windows: Mapping[FlowKey, datetime]
    ) -> dict[FlowKey, Usage]:
        c = t.runs.c
        workflows = sorted({key[0] for key in keys})
        held = (
            sa.select(c.workflow_id, c.concurrency_key, sa.func.count().label("n"))
            .where(c.workflow_id.in_(workflows), c.status.in_(_HOLDING))
            .group_by(c.workflow_id, c.concurrency_key)
        )
        active: dict[FlowKey, int] = {}
        for row in await self.tx.execute(held, "count runs holding a slot"):
            for key in keys_of_run(row.workflow_id, row.concurrency_key):
                active[key] = active.get(key, 0) + row.n
        starts: dict[FlowKey, list[datetime]] = {}
        if windows:
            since = min(windows.values())
            window_workflows = sorted({key[0] for key in windows})
            started = sa.select(c.workflow_id, c.concurrency_key, c.started_at).where(
                c.workflow_id.in_(window_workflows), c.started_at > since
            )
            for row in await self.tx.execute(started, "count starts in rate windows"):
                for key in keys_of_run(row.workflow_id, row.concurrency_key):
                    cutoff = windows.get(key)
                    if cutoff is not None and row.started_at > cutoff:
                        starts.setdefault(key, []).append(row.started_at)
        return tally(keys, active, starts)
