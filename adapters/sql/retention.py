"""``tx.retention`` on SQL: select expired terminal runs, delete them with every row of
theirs (``ports/retention.py``).

A purge is a handful of set-oriented DELETEs, one per table, keyed by run id: the
tables that hold per-run rows carry ``run_id`` and an index that starts with it. The
runs go first, and only those still terminal in this transaction (locked on PostgreSQL),
so a run rerun or resumed since it was selected is never purged; everything else is
deleted for the runs actually deleted, and so are their offloaded payloads when they
live in this database's ``blobs`` table (another blob store cannot join the transaction:
the kernel deletes those after the commit). Idempotency records name their run only in their
cached result (``result->>'workflow_run_id'``), which no index covers: that DELETE scans
the table once per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa

from treadle.adapters.sql import schema as t
from treadle.adapters.sql.payloads import PayloadOffload
from treadle.kernel.model import RunStatus


class Statements(Protocol):
    """What retention uses of a ``SqlTransaction`` (which imports this module)."""

    @property
    def is_postgres(self) -> bool: ...

    @property
    def payloads(self) -> PayloadOffload | None: ...

    async def execute(self, statement: Any, what: str = ..., parameters: Any = None) -> Any: ...


_TERMINAL = tuple(s.value for s in RunStatus if s.terminal)
_PER_RUN = (
    t.stages,
    t.jobs,
    t.journal,
    t.signal_inbox,
    t.timers,
    t.outbox,
    t.logs,
    t.annotations,
    t.run_event_seq,
    t.ai_calls,
    t.ai_run_totals,
)
"""Every table with a ``run_id`` column, each deleted by it."""


def under_prefix(column: sa.ColumnElement[str], prefix: str) -> sa.ColumnElement[bool]:
    """``column`` starts with ``prefix``, as a key range: exact and case-sensitive on both
    dialects (LIKE is neither on SQLite), no escaping, and an index range scan (keys are
    byte-ordered: collation C on PostgreSQL, BINARY on SQLite). ``prefix`` is not empty."""
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return sa.and_(column >= prefix, column < upper)


class SqlRetention:
    """The retention operations of one ``SqlTransaction``."""

    def __init__(self, tx: Statements) -> None:
        self._tx = tx

    async def expired_runs(
        self,
        *,
        cutoffs: Mapping[str, datetime],
        default_cutoff: datetime | None,
        statuses: frozenset[RunStatus],
        limit: int,
    ) -> list[str]:
        wanted = [s.value for s in statuses if s.terminal]
        runs = t.runs.c
        ended = runs.completed_at  # set on every terminal run; indexed with the status
        chosen: list[sa.ColumnElement[bool]] = [
            sa.and_(runs.workflow_id == workflow_id, ended < cutoff)
            for workflow_id, cutoff in cutoffs.items()
        ]
        if default_cutoff is not None:
            others = runs.workflow_id.not_in(list(cutoffs)) if cutoffs else sa.true()
            chosen.append(sa.and_(others, ended < default_cutoff))
        if not wanted or not chosen:
            return []
        query = (
            sa.select(runs.id)
            .where(runs.status.in_(wanted), sa.or_(*chosen))
            .order_by(ended, runs.id)
            .limit(limit)
        )
        return [row.id for row in await self._tx.execute(query, "expired runs")]

    async def purge_runs(self, run_ids: Sequence[str]) -> list[str]:
        if not run_ids:
            return []
        tx = self._tx
        runs = t.runs.c
        query: Any = sa.select(runs.id).where(
            runs.id.in_(list(run_ids)), runs.status.in_(_TERMINAL)
        )
        if tx.is_postgres:
            query = query.with_for_update()
        ids = [row.id for row in await tx.execute(query, "purge: lock runs")]
        if not ids:
            return []
        for table in _PER_RUN:
            await tx.execute(sa.delete(table).where(table.c.run_id.in_(ids)), "purge")
        await tx.execute(
            sa.delete(t.idempotency_keys).where(
                t.idempotency_keys.c.result["workflow_run_id"].as_string().in_(ids)
            ),
            "purge: idempotency records",
        )
        await tx.execute(sa.delete(t.runs).where(runs.id.in_(ids)), "purge: runs")
        if self._payloads_here():  # the blobs table: with the rows, one statement
            key = t.blobs.c.key
            prefixes = [PayloadOffload.run_prefix(run_id) for run_id in ids]
            await tx.execute(
                sa.delete(t.blobs).where(sa.or_(*(under_prefix(key, p) for p in prefixes))),
                "purge: payload blobs",
            )
        return ids

    def blob_prefixes(self, run_id: str) -> list[str]:
        if self._tx.payloads is None or self._payloads_here():
            return []  # nothing offloaded, or deleted with the rows
        return [PayloadOffload.run_prefix(run_id)]

    def _payloads_here(self) -> bool:
        """Offloaded payloads live in this database's ``blobs`` table (``SqlBlobStore``)."""
        payloads = self._tx.payloads
        return payloads is not None and payloads.same_database
