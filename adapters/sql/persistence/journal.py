"""Code-workflow journals in the SQL adapter: the ``Journal`` concern of one
``SqlTransaction``."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.sql.payloads import (
    escape,
    is_encoded,
)
from treadle.adapters.sql.persistence.shared import SqlUnit
from treadle.kernel.errors import (
    ConcurrencyError,
    DuplicateError,
)
from treadle.kernel.model import (
    MissingPayload,
    evolve,
)
from treadle.kernel.workflows.model import JournalEntry, JournalStatus


def _journal_values(entry: JournalEntry) -> dict[str, Any]:
    return {
        "run_id": entry.workflow_run_id,
        "position": entry.position,
        "step_name": entry.name,
        "occurrence": entry.occurrence,
        "kind": entry.kind,
        "status": entry.status.value,
        "attempts": entry.attempts,
        "input": entry.input,
        "result": entry.result,
        "error": entry.error,
        "idempotency_key": entry.idempotency_key,
        "created_at": entry.created_at,
        "completed_at": entry.completed_at,
    }


_JOURNAL_FIELDS = (
    "run_id",
    "position",
    "step_name",
    "occurrence",
    "kind",
    "status",
    "attempts",
    "input",
    "result",
    "error",
    "idempotency_key",
    "created_at",
    "completed_at",
    "version",
)

_PG_JOURNAL_ROWS = pg_bulk.RecordSet(
    t.journal, {name: name for name in _JOURNAL_FIELDS}, extra={"i": "INTEGER"}
)
"""New journal entries as one JSON parameter (``pg_bulk``), for the one-statement
commits (``journal_set.py``, ``write_set.py``)."""


def pg_insert_journal_sql(rows: str, where: str) -> str:
    """``INSERT INTO journal ... SELECT`` the entries of parameter ``rows`` (in their
    order, ``i``) only ``where`` holds; ``RETURNING id, position``. An entry whose
    (name, occurrence) or position is taken inserts nothing (``ON CONFLICT DO NOTHING``):
    the caller compares the count with what it sent, as ``insert`` raises
    ``DuplicateError``."""
    return pg_bulk.insert_select_sql(
        t.journal,
        _PG_JOURNAL_ROWS,
        {name: _PG_JOURNAL_ROWS.value(name) for name in _JOURNAL_FIELDS},
        order_by="i",
        suffix="ON CONFLICT DO NOTHING RETURNING id, position",
        rows=rows,
        where=where,
    )


def pg_journal_rows(entries: list[JournalEntry], offloads: Any) -> list[dict[str, Any]] | None:
    """The rows of new ``entries`` for ``_PG_JOURNAL_ROWS``, or ``None`` when a value
    would go to the blob store (``offloads(value)``; the per-entry ``insert`` stores it)."""
    rows: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        values = _journal_values(entry)
        for column in ("input", "result"):
            value = values[column]
            if value is None:
                continue
            if type(value) is MissingPayload:
                return None
            value = escape(value)
            if offloads is not None and offloads(value):
                return None
            values[column] = value
        values["version"] = 0
        values["i"] = i
        rows.append(values)
    return rows


def _journal_from_row(row: sa.Row[Any]) -> JournalEntry:
    return JournalEntry(
        id=int(row.id),
        workflow_run_id=row.run_id,
        position=row.position,
        name=row.step_name,
        occurrence=row.occurrence,
        kind=row.kind,
        status=JournalStatus(row.status),
        attempts=row.attempts,
        input=row.input,
        result=row.result,
        error=row.error,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
        completed_at=row.completed_at,
        version=row.version,
    )


class SqlJournal:
    """Code-workflow journals on this transaction's connection (``tx.journal``)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlUnit) -> None:
        self._tx = tx

    async def entries(
        self,
        run_id: str,
        *,
        status: JournalStatus | None = None,
        from_position: int | None = None,
    ) -> list[JournalEntry]:
        c = t.journal.c
        query = sa.select(t.journal).where(c.run_id == run_id).order_by(c.position)
        if status is not None:
            # Inline, not a parameter: a prepared statement's generic plan can then still
            # prove ``status = 'WAITING'`` and use the partial index ix_journal_waiting.
            query = query.where(c.status == sa.literal(status.value, literal_execute=True))
        if from_position is not None:  # a range of the (run_id, position) unique index
            query = query.where(c.position >= from_position)
        rows = await self._tx.execute(query, "get journal")
        return [await self._journal_from(row) for row in rows]

    async def get(self, run_id: str, name: str, occurrence: int) -> JournalEntry | None:
        c = t.journal.c
        query = sa.select(t.journal).where(
            c.run_id == run_id, c.step_name == name, c.occurrence == occurrence
        )
        row = (await self._tx.execute(query, "get journal entry")).first()
        return await self._journal_from(row) if row is not None else None

    async def latest(self, run_id: str, name: str) -> JournalEntry | None:
        c = t.journal.c
        query = (
            sa.select(t.journal)
            .where(c.run_id == run_id, c.step_name == name)
            .order_by(c.occurrence.desc())
            .limit(1)
        )
        row = (await self._tx.execute(query, "latest journal entry")).first()
        return await self._journal_from(row) if row is not None else None

    async def _journal_from(self, row: sa.Row[Any]) -> JournalEntry:
        entry = _journal_from_row(row)
        if is_encoded(entry.input) or is_encoded(entry.result):
            run_id = entry.workflow_run_id
            loaded = {
                "input": await self._tx._get_payload(entry.input, run_id),
                "result": await self._tx._get_payload(entry.result, run_id),
            }
            entry = evolve(entry, loaded)
        return entry

    async def _journal_row(self, entry: JournalEntry) -> dict[str, Any]:
        values = _journal_values(entry)
        for column in ("input", "result"):
            values[column] = await self._tx._put_payload(entry.workflow_run_id, values[column])
        return values

    async def insert(self, entry: JournalEntry) -> JournalEntry:
        values = await self._journal_row(entry)
        values["version"] = 0
        stmt = (
            self._tx.dialect.insert(t.journal)
            .values(values)
            .on_conflict_do_nothing()
            .returning(t.journal.c.id)
        )
        row = (await self._tx.execute(stmt, "insert journal entry")).first()
        if row is None:
            raise DuplicateError(
                f"journal of run {entry.workflow_run_id!r} already has {entry.name!r} "
                f"#{entry.occurrence} or position {entry.position}"
            )
        return evolve(entry, {"id": int(row[0]), "version": 0})

    async def update(self, entry: JournalEntry) -> JournalEntry:
        c = t.journal.c
        values = await self._journal_row(entry)
        values["version"] = entry.version + 1
        stmt = (
            sa.update(t.journal)
            .where(
                c.run_id == entry.workflow_run_id,
                c.position == entry.position,
                c.step_name == entry.name,
                c.occurrence == entry.occurrence,
                c.version == entry.version,
            )
            .values(values)
            .returning(c.id)
        )
        row = (await self._tx.execute(stmt, "update journal entry")).first()
        if row is None:
            raise ConcurrencyError(
                f"journal entry {entry.name!r} #{entry.occurrence} of run "
                f"{entry.workflow_run_id!r} was updated concurrently"
            )
        return evolve(entry, {"id": int(row[0]), "version": entry.version + 1})
