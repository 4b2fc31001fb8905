"""The outbox in the SQL adapter: the ``Outbox`` concern of one
``SqlTransaction``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa

import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.sql import wake_interest
from treadle.adapters.sql.dialect import SetWrite
from treadle.adapters.sql.payloads import (
    escape,
    is_encoded,
)
from treadle.adapters.sql.persistence.shared import SqlUnit
from treadle.kernel.errors import (
    PayloadMissingError,
    StorageError,
    describe_exception,
)
from treadle.kernel.events import RUN_END_EVENTS, EventBase, OutboxRecord, parse_event
from treadle.kernel.model import (
    evolve,
)


def _outbox_record(row: sa.Row[Any]) -> OutboxRecord:
    return OutboxRecord.model_construct(
        id=int(row.id),
        event=cast(Any, parse_event(row.event)),
        attempts=int(row.attempts),
        published=bool(row.published),
        dead_lettered=bool(row.dead_lettered),
        last_error=row.last_error,
        retry_at=row.retry_at,
    )


_PG_SEQ_ROWS = pg_bulk.RecordSet(
    t.run_event_seq, {"run_id": "run_id", "last_sequence": "last_sequence"}
)


_PG_ALLOCATE_SEQUENCES = pg_bulk.insert_select(
    t.run_event_seq,
    _PG_SEQ_ROWS,
    {"run_id": _PG_SEQ_ROWS.value("run_id"), "last_sequence": _PG_SEQ_ROWS.value("last_sequence")},
    order_by="run_id",  # locks the counters in run-id order: deadlock-free
    suffix="ON CONFLICT (run_id) DO UPDATE SET last_sequence = "
    "run_event_seq.last_sequence + excluded.last_sequence RETURNING run_id, last_sequence",
)


_OUTBOX_FIELDS = ("run_id", "sequence", "event_type", "event", "created_at")


_PG_OUTBOX_ROWS = pg_bulk.RecordSet(
    t.outbox, {name: name for name in _OUTBOX_FIELDS}, extra={"i": "INTEGER"}
)


_PG_INSERT_OUTBOX = pg_bulk.insert_select(
    t.outbox,
    _PG_OUTBOX_ROWS,
    {name: _PG_OUTBOX_ROWS.value(name) for name in _OUTBOX_FIELDS}
    | {"published": "false", "dead_lettered": "false", "attempts": "0"},
    order_by="i",  # outbox ids in the order of the events
)


def pg_append_events_ctes(
    *, rows: str = "rows", prefix: str = "", where: str = "", once: str = ""
) -> tuple[list[str], str]:
    """The parts of ``_pg_append_events``: its CTEs (``name AS (...)``, names starting
    with ``prefix``) and its final INSERT (``... RETURNING run_id, sequence``), for a
    statement that combines it with other writes (``write_set.py``). ``rows``: the
    parameter's name; ``where``: a condition without which no counter is taken and no
    event inserted; ``once``: FROM items evaluated once (``(SELECT pg_notify(...)) AS
    x, ``)."""
    v, n, s, q = (prefix + name for name in ("v", "n", "s", "q"))
    source = _PG_OUTBOX_ROWS.source_for(rows)
    condition = f" WHERE {where}" if where else ""
    ctes = [
        f"{v} AS (SELECT * FROM {source})",
        f"{n} AS (SELECT {v}.run_id, count(*) AS n FROM {v} GROUP BY {v}.run_id)",
        f"{s} AS (INSERT INTO run_event_seq (run_id, last_sequence) "
        f"SELECT {n}.run_id, {n}.n FROM {n}{condition} ORDER BY {n}.run_id "
        "ON CONFLICT (run_id) DO UPDATE SET last_sequence = "
        "run_event_seq.last_sequence + excluded.last_sequence "
        "RETURNING run_id, last_sequence)",
        f"{q} AS (SELECT {v}.i, {v}.run_id, {v}.event_type, {v}.event, {v}.created_at, "
        f"{s}.last_sequence - {n}.n + row_number() OVER (PARTITION BY {v}.run_id ORDER BY {v}.i) "
        f"AS sequence FROM {v} JOIN {n} ON {n}.run_id = {v}.run_id "
        f"JOIN {s} ON {s}.run_id = {v}.run_id)",
    ]
    insert = (
        "INSERT INTO outbox (run_id, sequence, event_type, event, created_at, published, "
        "dead_lettered, attempts) "
        f"SELECT {q}.run_id, {q}.sequence, {q}.event_type, "
        f"jsonb_set({q}.event -> 0, '{{sequence}}', to_jsonb({q}.sequence)), {q}.created_at, "
        f"false, false, 0 FROM {once}{q} ORDER BY {q}.i RETURNING run_id, sequence"
    )
    return ctes, insert


FEED_NOTIFY = wake_interest.FEED_NOTIFY
"""Tells live event readers (``adapters/event_feed.py``) on commit, while one is
announced (``adapters/sql/wake_interest.py``)."""


def _pg_append_events(feed: bool = True) -> sa.TextClause:
    """``append_events`` on PostgreSQL in ONE statement: reserve each run's sequence
    numbers (the counters locked in run-id order, as ``_PG_ALLOCATE_SEQUENCES`` does),
    number the events of each run in their order, write each number into its event's
    JSON (``jsonb_set``) and insert the rows, with the event feed's NOTIFY (while a live
    reader is announced). A run end's NOTIFY is the ``runs`` trigger's (for marked runs
    only, ``adapters/sql/wake_interest.py``).
    RETURNING gives each inserted row's run and sequence, from which the caller derives
    every event's number (consecutive per run, in the events' order). Not for events
    offloaded to the blob store: their JSON is a reference, so the caller allocates
    first and writes the numbers into the events itself (two statements)."""
    once = f"(SELECT {FEED_NOTIFY}) AS feed, " if feed else ""
    ctes, insert = pg_append_events_ctes(once=once)
    sql = f"WITH {', '.join(ctes)} {insert}"
    return sa.text(sql).bindparams(sa.bindparam("rows", type_=sa.Text()))


_PG_APPEND_EVENTS = _pg_append_events()


_PG_APPEND_EVENTS_QUIET = _pg_append_events(feed=False)
"""``_PG_APPEND_EVENTS`` without the event feed's NOTIFY (``notify_events=False``)."""


_INSERT_OUTBOX = sa.insert(t.outbox)

_PG_NOTIFY_FEED = sa.text(f"SELECT {FEED_NOTIFY}")


def _allocate_statement(tx: SqlUnit) -> Any:
    seq = t.run_event_seq
    ins = tx.dialect.insert(seq)
    return ins.on_conflict_do_update(
        index_elements=[seq.c.run_id],
        set_={"last_sequence": seq.c.last_sequence + ins.excluded.last_sequence},
    ).returning(seq.c.run_id, seq.c.last_sequence)


_ALLOCATE = SetWrite(
    "allocate_sequences_many",
    _PG_ALLOCATE_SEQUENCES,
    _PG_SEQ_ROWS,
    sqlite_build=_allocate_statement,
)
_APPEND = SetWrite(
    "append_events", _PG_INSERT_OUTBOX, _PG_OUTBOX_ROWS, numbered=True, sqlite=_INSERT_OUTBOX
)


def inline_event_rows(tx: SqlUnit, events: Sequence[EventBase]) -> list[dict[str, Any]] | None:
    """The outbox rows of ``events`` for a statement that numbers them on the server
    (``sequence`` 0, ``i`` their order), or ``None`` when one's JSON goes to the blob
    store: such a set takes the per-kind path, which stores it once with its number.
    Shared by the one-statement writes (``append``, ``write_set``, ``insert_set``,
    ``append_journal``)."""
    offloads = tx.payloads.offloads if tx.payloads is not None else None
    rows: list[dict[str, Any]] = []
    for i, event in enumerate(events):
        stored = escape(event.model_dump(mode="json"))
        if offloads is not None and offloads(stored):
            return None
        rows.append(
            {
                "i": i,
                "run_id": event.workflow_run_id,
                "sequence": 0,  # numbered by the statement
                "event_type": str(getattr(event, "type", type(event).__name__)),
                "event": stored,
                "created_at": event.timestamp,
            }
        )
    return rows


class SqlOutbox:
    """The outbox on this transaction's connection (``tx.outbox``, the ``OutboxStore`` port)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlUnit) -> None:
        self._tx = tx

    async def _outbox_from(self, row: sa.Row[Any]) -> OutboxRecord:
        """The record of an outbox row; ``PayloadMissingError`` if its event's blob is gone."""
        if not is_encoded(row.event):
            return _outbox_record(row)
        return OutboxRecord.model_construct(
            id=int(row.id),
            event=cast(Any, parse_event(await self._tx._get_payload(row.event, row.run_id))),
            attempts=int(row.attempts),
            published=bool(row.published),
            dead_lettered=bool(row.dead_lettered),
            last_error=row.last_error,
            retry_at=row.retry_at,
        )

    async def _allocate_sequences(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Reserve ``counts[run_id]`` sequence numbers per run; returns each run's first.

        One multi-row upsert (an executemany with RETURNING, which SQLAlchemy sends as
        one INSERT ... VALUES (...), (...) ... ON CONFLICT DO UPDATE ... RETURNING). Its
        rows are in run-id order, so two transactions appending for the same runs lock
        their counters in the same order and cannot deadlock on PostgreSQL."""
        params = [{"run_id": r, "last_sequence": counts[r]} for r in sorted(counts)]
        rows = await self._tx.dialect.write_many(
            self._tx, _ALLOCATE, params, "allocate event sequence"
        )
        first = {str(run_id): int(last) - counts[run_id] + 1 for run_id, last in rows}
        if first.keys() != counts.keys():
            raise StorageError("allocating event sequences returned other runs than asked")
        return first

    async def append(self, events: Sequence[EventBase]) -> list[EventBase]:
        self._tx._check()
        if not events:
            return []
        self._tx.appended_events = True
        counts: dict[str, int] = {}
        for event in events:
            counts[event.workflow_run_id] = counts.get(event.workflow_run_id, 0) + 1
        if self._tx.dialect.set_statements:
            appended = await self._append_numbering_on_server(events, counts)
            if appended is not None:
                return appended
        next_seq = await self._allocate_sequences(counts)
        stored: list[EventBase] = []
        rows: list[dict[str, Any]] = []
        for event in events:
            seq = next_seq[event.workflow_run_id]
            next_seq[event.workflow_run_id] = seq + 1
            event = evolve(event, {"sequence": seq})
            stored.append(event)
            rows.append(
                {
                    "run_id": event.workflow_run_id,
                    "sequence": seq,
                    "event_type": str(getattr(event, "type", type(event).__name__)),
                    "event": await self._tx._put_payload(
                        event.workflow_run_id, event.model_dump(mode="json")
                    ),
                    "created_at": event.timestamp,
                    "published": False,
                    "dead_lettered": False,
                    "attempts": 0,
                }
            )
        self._note_ended(rows)
        # PostgreSQL: one statement of one parameter; SQLite: a list of parameter sets,
        # one cached statement batched into one round trip.
        await self._tx.dialect.write_many(self._tx, _APPEND, rows, "append events")
        if (
            self._tx.dialect.is_postgres and self._tx.notify_events
        ):  # the one-statement path sends it within its statement
            await self._tx.execute(_PG_NOTIFY_FEED, "notify event feed")
        return stored

    def _note_ended(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """The runs whose end ``rows`` (outbox rows) record, noted for the run-end
        watchers, who are told only once the transaction commits (``ended_runs``)."""
        ended = [row["run_id"] for row in rows if row["event_type"] in RUN_END_EVENTS]
        if ended:
            if self._tx.ended_runs is None:
                self._tx.ended_runs = []
            self._tx.ended_runs.extend(ended)
        return ended

    async def _append_numbering_on_server(
        self, events: Sequence[EventBase], counts: Mapping[str, int]
    ) -> list[EventBase] | None:
        """``append_events`` in one statement (``_pg_append_events``), or ``None`` when
        an event's JSON went to the blob store (the caller's two statements do it)."""
        # Asked before anything is stored: an event for the blob store sends the whole
        # append down the two-statement path, which stores it (once) with its number.
        rows = inline_event_rows(self._tx, events)
        if rows is None:
            return None
        params: dict[str, Any] = _PG_OUTBOX_ROWS.encode(rows)
        self._note_ended(rows)  # told to the watchers only once this commits
        statement = _PG_APPEND_EVENTS if self._tx.notify_events else _PG_APPEND_EVENTS_QUIET
        first: dict[str, int] = {}
        for run_id, sequence in await self._tx.execute(statement, "append events", params):
            if run_id not in first or sequence < first[run_id]:
                first[run_id] = int(sequence)
        if first.keys() != counts.keys():
            raise StorageError("appending events returned other runs than asked")
        stored_events: list[EventBase] = []
        for event in events:
            seq = first[event.workflow_run_id]
            first[event.workflow_run_id] = seq + 1
            stored_events.append(evolve(event, {"sequence": seq}))
        return stored_events

    async def events_after(self, after_id: int, limit: int) -> list[tuple[int, EventBase]]:
        o = t.outbox.c
        query = sa.select(o.id, o.run_id, o.event).where(o.id > after_id).order_by(o.id)
        rows = await self._tx.execute(query.limit(max(limit, 0)), "event feed")
        return [
            (int(outbox_id), parse_event(await self._tx._get_payload(data, run_id)))
            for outbox_id, run_id, data in rows
        ]

    async def last_event_id(self) -> int:
        query = sa.select(sa.func.max(t.outbox.c.id))
        found = (await self._tx.execute(query, "last event id")).scalar()
        return int(found or 0)

    async def unpublished(self, limit: int) -> list[OutboxRecord]:
        query = (
            sa.select(t.outbox)
            .where(t.outbox.c.published.is_(False), t.outbox.c.dead_lettered.is_(False))
            .order_by(t.outbox.c.id)
            .limit(limit)
        )
        records: list[OutboxRecord] = []
        for row in await self._tx.execute(query, "unpublished events"):
            try:
                records.append(await self._outbox_from(row))
            except PayloadMissingError as exc:
                # An event whose blob is gone can never be published: dead-lettered now,
                # with the reason, so it neither fails every run's flush nor comes back.
                error = describe_exception(exc)
                await self.record_failure(row.id, error, dead_letter=True)
        return records

    async def mark_published(self, outbox_ids: Sequence[int]) -> None:
        self._tx._check()
        if not outbox_ids:
            return
        stmt = (
            sa.update(t.outbox)
            .where(t.outbox.c.id.in_(list(outbox_ids)))
            .values(published=True, dead_lettered=False, published_at=datetime.now(UTC))
        )
        await self._tx.execute(stmt, "mark published")

    async def record_failure(
        self, outbox_id: int, error: str, *, dead_letter: bool, retry_at: datetime | None = None
    ) -> None:
        values: dict[str, Any] = {
            "attempts": t.outbox.c.attempts + 1,
            "last_error": error,
            "retry_at": retry_at,
        }
        if dead_letter:
            values["dead_lettered"] = True
        stmt = sa.update(t.outbox).where(t.outbox.c.id == outbox_id).values(values)
        await self._tx.execute(stmt, "record publish failure")

    async def dead_lettered(self, limit: int) -> list[OutboxRecord]:
        query = (
            sa.select(t.outbox)
            .where(t.outbox.c.published.is_(False), t.outbox.c.dead_lettered.is_(True))
            .order_by(t.outbox.c.id)
            .limit(limit)
        )
        records: list[OutboxRecord] = []
        for row in await self._tx.execute(query, "dead letters"):
            # One whose event's blob is gone cannot be replayed; its row keeps the reason.
            with suppress(PayloadMissingError):
                records.append(await self._outbox_from(row))
        return records

    async def requeue_dead_letters(self, outbox_ids: Sequence[int]) -> int:
        self._tx._check()
        if not outbox_ids:
            return 0
        stmt = (
            sa.update(t.outbox)
            .where(
                t.outbox.c.id.in_(list(outbox_ids)),
                t.outbox.c.published.is_(False),
                t.outbox.c.dead_lettered.is_(True),
            )
            .values(dead_lettered=False, attempts=0, retry_at=None)
        )
        # The condition is re-checked under the row lock: of two concurrent replays of a
        # row, one counts it.
        return int((await self._tx.execute(stmt, "requeue dead letters")).rowcount)

    async def events_for_run(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        query = (
            sa.select(t.outbox.c.event)
            .where(t.outbox.c.run_id == run_id, t.outbox.c.sequence > after_sequence)
            .order_by(t.outbox.c.sequence)
        )
        rows = await self._tx.execute(query, "events for run")
        return [parse_event(await self._tx._get_payload(data, run_id)) for (data,) in rows]
