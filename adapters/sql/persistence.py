"""SQL Persistence on SQLAlchemy 2 Core (asyncio): PostgreSQL and SQLite.

One ``SqlTransaction`` is one database transaction on one connection; the SQL
job transport runs its statements on the same connection, so a state change
and the jobs it creates commit together. Semantics follow the in-memory
reference adapter exactly (the shared contract suites hold both to it):

* optimistic concurrency: ``UPDATE ... WHERE version = :expected``; no row
  updated means someone else won, a ``ConcurrencyError``;
* inserts use ``ON CONFLICT DO NOTHING`` (or check first) and raise
  ``DuplicateError`` themselves, so a caught duplicate does not poison the rest
  of a PostgreSQL transaction;
* per-run event sequences are allocated by an upsert on ``run_event_seq``
  inside the transaction: the row lock serialises appenders per run and a
  rollback gives the numbers back, so sequences stay gap-free;
* every driver error is translated at this boundary (``errors.translate``) and
  a failing transaction rolls back completely.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.due_times import (
    DueCallback,
    DueKind,
    DueWatchers,
    due_payload,
    earliest,
)
from treadle.adapters.run_ends import RUN_END_PREFIX, RunEndCallback, RunEndWatchers
from treadle.adapters.sql.engine import (
    DEFAULT_BUSY_TIMEOUT_MS,
    NOTIFY_CHANNEL,
    READ_ONLY_OPTION,
    configure_sqlite,
    create_engine,
)
from treadle.adapters.sql.errors import translate
from treadle.adapters.sql.flow_control import SqlFlowControl
from treadle.adapters.sql.payloads import (
    PayloadOffload,
    escape,
    is_encoded,
    is_ref,
    missing,
    reference_of,
    unescape,
)
from treadle.adapters.sql.retention import SqlRetention
from treadle.kernel.errors import (
    ConcurrencyError,
    DuplicateError,
    PayloadMissingError,
    StorageError,
    TransientStorageError,
    TreadleError,
    describe_exception,
)
from treadle.kernel.events import RUN_END_EVENTS, EventBase, OutboxRecord, parse_event
from treadle.kernel.model import (
    Annotation,
    IdempotencyRecord,
    IdempotencyState,
    JsonValue,
    LogRecord,
    MissingPayload,
    Run,
    RunFilter,
    RunStatus,
    StageRun,
    StageStatus,
    construct,
    evolve,
)
from treadle.kernel.workflows.model import InboxMessage, JournalEntry, JournalStatus, Timer

if TYPE_CHECKING:
    from treadle.ports import BlobStore

_RUN_COLUMNS = tuple(c.name for c in t.runs.columns)
_PREPARED: dict[tuple[str, str], Any] = {}
"""Hot-path statements per (dialect, name): see ``SqlTransaction.prepared``."""
_RUN_PAYLOADS = ("input", "output")
_STAGE_PAYLOADS = ("output", "suspended_state", "resume_state")
_STAGE_FIELDS = tuple(name for name in StageRun.model_fields if name != "workflow_run_id")


def _plain(value: Any) -> Any:
    # Enums go in as their values: drivers differ on how they adapt Enum subclasses.
    return value.value if isinstance(value, Enum) else value


def _run_values(run: Run) -> dict[str, Any]:
    values = run.__dict__
    return {name: _plain(values[name]) for name in _RUN_COLUMNS}


def _run_from_row(row: sa.Row[Any]) -> Run:
    return Run.model_validate(dict(row._mapping))


def _stage_values(stage: StageRun) -> dict[str, Any]:
    values = stage.__dict__
    out = {name: _plain(values[name]) for name in _STAGE_FIELDS}
    out["run_id"] = stage.workflow_run_id
    return out


def _stage_from_columns(data: dict[str, Any]) -> StageRun:
    """A ``StageRun`` from a ``stages`` row's columns (``data`` is consumed).

    Built with ``construct``, not validated: every column already comes back as its
    field's type (the column types see to it: integers, UTC datetimes, ``Duration``,
    JSON), except the status text, converted here, which rejects an unknown value. The
    schema is the validation; pydantic's would cost more than the rest of reading the
    row, about four times per stage committed."""
    data["workflow_run_id"] = data.pop("run_id")
    data.pop("ordinal", None)
    data["status"] = StageStatus(data["status"])
    return construct(StageRun, data)


def _stage_from_row(row: sa.Row[Any]) -> StageRun:
    return _stage_from_columns(dict(row._mapping))


def _outbox_record(row: sa.Row[Any]) -> OutboxRecord:
    return OutboxRecord.model_construct(
        id=int(row.id),
        event=cast(Any, parse_event(row.event)),
        attempts=int(row.attempts),
        published=bool(row.published),
        dead_lettered=bool(row.dead_lettered),
        last_error=row.last_error,
    )


def _annotation_from_row(row: sa.Row[Any]) -> Annotation:
    return Annotation(
        id=row.id,
        workflow_run_id=row.run_id,
        attributes=row.attributes,
        actor=row.actor,
        scope=row.scope,
        stage_id=row.stage_id,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
    )


def _sqlite_json_equals(column: sa.ColumnElement[Any], path: str, value: Any) -> Any:
    """``column`` at JSON ``path`` equals ``value`` with JSONB's semantics on SQLite: types
    must agree (``json_extract`` alone makes ``true`` equal ``1``) and objects compare by
    content, not by the key order of their text."""
    kind = sa.func.json_type(column, path)
    if value is None:
        return kind == "null"
    if isinstance(value, bool):
        return kind == ("true" if value else "false")
    if isinstance(value, int | float):
        return sa.and_(kind.in_(("integer", "real")), sa.func.json_extract(column, path) == value)
    if isinstance(value, str):
        return sa.and_(kind == "text", sa.func.json_extract(column, path) == value)
    if isinstance(value, list | tuple):
        items = [_sqlite_json_equals(column, f"{path}[{i}]", v) for i, v in enumerate(value)]
        return sa.and_(
            kind == "array", sa.func.json_array_length(column, path) == len(value), *items
        )
    if isinstance(value, dict):
        members = sa.func.json_each(column, path).table_valued("key")
        count = sa.select(sa.func.count()).select_from(members).scalar_subquery()
        fields = [
            _sqlite_json_equals(column, path + '."' + k.replace('"', '\\"') + '"', v)
            for k, v in value.items()
        ]
        return sa.and_(kind == "object", count == len(value), *fields)
    raise TypeError(f"cannot filter on a {type(value).__name__} attribute value")


_GET_RUN = sa.select(t.runs).where(t.runs.c.id == sa.bindparam("run_id"))
_UPDATE_RUN = sa.update(t.runs).where(
    t.runs.c.id == sa.bindparam("w_id"), t.runs.c.version == sa.bindparam("w_version")
)
_GET_STAGES = (
    sa.select(t.stages)
    .where(t.stages.c.run_id == sa.bindparam("run_id"))
    .order_by(t.stages.c.execution_group, t.stages.c.ordinal)
)
_GET_STAGE = sa.select(t.stages).where(
    t.stages.c.run_id == sa.bindparam("run_id"), t.stages.c.stage_id == sa.bindparam("stage_id")
)
_UPDATE_STAGE = sa.update(t.stages).where(
    t.stages.c.run_id == sa.bindparam("w_run_id"),
    t.stages.c.stage_id == sa.bindparam("w_stage_id"),
    t.stages.c.version == sa.bindparam("w_version"),
)
_GET_RUNS = (
    sa.select(t.runs)
    .where(t.runs.c.id.in_(sa.bindparam("run_ids", expanding=True)))
    .order_by(t.runs.c.id)  # with FOR UPDATE: locks taken in id order (deadlock-free)
)
_FIND_STAGES = sa.select(t.stages).where(
    t.stages.c.run_id.in_(sa.bindparam("run_ids", expanding=True)),
    t.stages.c.stage_id.in_(sa.bindparam("stage_ids", expanding=True)),
)
_INSERT_STAGE = sa.insert(t.stages)

# PostgreSQL: the set-oriented writes as one statement of one parameter (pg_bulk.py).
_STAGE_SET = tuple(name for name in _STAGE_FIELDS if name != "stage_id")
_PG_STAGE_ROWS = pg_bulk.RecordSet(
    t.stages,
    {"w_run_id": "run_id", "w_stage_id": "stage_id", "w_version": "version"}
    | {name: name for name in _STAGE_SET},
)
_PG_UPDATE_STAGES = pg_bulk.update_from(
    t.stages,
    _PG_STAGE_ROWS,
    {"run_id": "w_run_id", "stage_id": "w_stage_id"},
    {"version": "w_version"},
    _STAGE_SET,
)
_RUN_SET = tuple(name for name in _RUN_COLUMNS if name != "id")
_PG_RUN_ROWS = pg_bulk.RecordSet(
    t.runs, {"w_id": "id", "w_version": "version"} | {name: name for name in _RUN_SET}
)
_PG_UPDATE_RUNS = pg_bulk.update_from(
    t.runs, _PG_RUN_ROWS, {"id": "w_id"}, {"version": "w_version"}, _RUN_SET
)
_PG_SEQ_ROWS = pg_bulk.RecordSet(t.run_event_seq, {"run_id": "run_id", "n": "last_sequence"})
_PG_ALLOCATE_SEQUENCES = pg_bulk.insert_select(
    t.run_event_seq,
    _PG_SEQ_ROWS,
    {"run_id": _PG_SEQ_ROWS.value("run_id"), "last_sequence": _PG_SEQ_ROWS.value("n")},
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


def _pg_append_events(notify: bool) -> sa.TextClause:
    """``append_events`` on PostgreSQL in ONE statement: reserve each run's sequence
    numbers (the counters locked in run-id order, as ``_PG_ALLOCATE_SEQUENCES`` does),
    number the events of each run in their order, write each number into its event's
    JSON (``jsonb_set``) and insert the rows; with ``notify``, the run-end NOTIFY too.
    RETURNING gives each inserted row's run and sequence, from which the caller derives
    every event's number (consecutive per run, in the events' order). Not for events
    offloaded to the blob store: their JSON is a reference, so the caller allocates
    first and writes the numbers into the events itself (two statements)."""
    rows = _PG_OUTBOX_ROWS
    once = "(SELECT pg_notify(:channel, :payload)) AS once, " if notify else ""
    sql = (
        f"WITH v AS (SELECT * FROM {rows.source}), "
        "n AS (SELECT v.run_id, count(*) AS n FROM v GROUP BY v.run_id), "
        "s AS (INSERT INTO run_event_seq (run_id, last_sequence) "
        "SELECT n.run_id, n.n FROM n ORDER BY n.run_id "
        "ON CONFLICT (run_id) DO UPDATE SET last_sequence = "
        "run_event_seq.last_sequence + excluded.last_sequence "
        "RETURNING run_id, last_sequence), "
        "q AS (SELECT v.i, v.run_id, v.event_type, v.event, v.created_at, "
        "s.last_sequence - n.n + row_number() OVER (PARTITION BY v.run_id ORDER BY v.i) "
        "AS sequence FROM v JOIN n ON n.run_id = v.run_id JOIN s ON s.run_id = v.run_id) "
        "INSERT INTO outbox (run_id, sequence, event_type, event, created_at, published, "
        "dead_lettered, attempts) "
        "SELECT q.run_id, q.sequence, q.event_type, "
        "jsonb_set(q.event -> 0, '{sequence}', to_jsonb(q.sequence)), q.created_at, "
        f"false, false, 0 FROM {once}q ORDER BY q.i RETURNING run_id, sequence"
    )
    statement = sa.text(sql).bindparams(sa.bindparam("rows", type_=sa.Text()))
    if notify:
        statement = statement.bindparams(sa.bindparam("channel", value=NOTIFY_CHANNEL))
    return statement


_PG_APPEND_EVENTS = _pg_append_events(notify=False)
_PG_APPEND_EVENTS_ENDED = _pg_append_events(notify=True)

_IDEMPOTENCY_FIELDS = ("key", "command_type", "state", "result", "started_at")
_PG_IDEMPOTENCY_ROWS = pg_bulk.RecordSet(
    t.idempotency_keys, {name: name for name in _IDEMPOTENCY_FIELDS}
)
_PG_PUT_IDEMPOTENCY = pg_bulk.insert_select(
    t.idempotency_keys,
    _PG_IDEMPOTENCY_ROWS,
    {name: _PG_IDEMPOTENCY_ROWS.value(name) for name in _IDEMPOTENCY_FIELDS},
    order_by="key",
    suffix="ON CONFLICT (key, command_type) DO UPDATE SET state = excluded.state, "
    "result = excluded.result, started_at = excluded.started_at",
)


def _stage_slots() -> sa.Select[Any]:
    """For ``insert_stages``, one row per requested run that exists: (run id, its highest
    ordinal or -1, the id of one of its stages among those requested, or NULL)."""
    ordinals = t.stages.alias("ordinals")
    taken = t.stages.alias("taken")
    highest = (
        sa.select(sa.func.coalesce(sa.func.max(ordinals.c.ordinal), -1))
        .where(ordinals.c.run_id == t.runs.c.id)
        .correlate(t.runs)
        .scalar_subquery()
    )
    joined = t.runs.outerjoin(
        taken,
        sa.and_(
            taken.c.run_id == t.runs.c.id,
            taken.c.stage_id.in_(sa.bindparam("stage_ids", expanding=True)),
        ),
    )
    return (
        sa.select(t.runs.c.id, highest, taken.c.stage_id)
        .select_from(joined)
        .where(t.runs.c.id.in_(sa.bindparam("run_ids", expanding=True)))
    )


_STAGE_SLOTS = _stage_slots()
_STAGE_COLUMNS = tuple(c.name for c in t.stages.columns)
_PG_NEW_STAGE_ROWS = pg_bulk.RecordSet(t.stages, {name: name for name in _STAGE_COLUMNS})
_PG_INSERT_STAGES = pg_bulk.insert_select(
    t.stages,
    _PG_NEW_STAGE_ROWS,
    {name: _PG_NEW_STAGE_ROWS.value(name) for name in _STAGE_COLUMNS},
    order_by="ordinal",
)
_STAGE_KEYS = ("run_id", "stage_id", "ordinal", "execution_group")
_BLANK_STAGE = _stage_values(StageRun(workflow_run_id="", stage_id="", execution_group=0))
"""A stage as ``run.create`` makes it: what every column but its keys holds."""
_PG_BLANK_STAGE_ROWS = pg_bulk.RecordSet(t.stages, {name: name for name in _STAGE_KEYS})
_PG_INSERT_BLANK_STAGES = pg_bulk.insert_select(
    t.stages,
    _PG_BLANK_STAGE_ROWS,
    {name: _PG_BLANK_STAGE_ROWS.value(name) for name in _STAGE_KEYS}
    | {
        name: pg_bulk.literal(t.stages.c[name], _BLANK_STAGE[name])
        for name in _STAGE_COLUMNS
        if name not in _STAGE_KEYS
    },
    order_by="ordinal",
)
_CACHED_CHECKS_FROM = 64
"""Stages from which ``insert_stages`` lets the server reuse its foreign key checks' plan."""
_PLAN_CACHE_AUTO = sa.text("SET LOCAL plan_cache_mode = auto")
_PLAN_CACHE_DEFAULT = sa.text("SET LOCAL plan_cache_mode TO DEFAULT")
_PG_NEW_RUN_ROWS = pg_bulk.RecordSet(
    t.runs, {name: name for name in _RUN_COLUMNS}, extra={"i": "INTEGER"}
)
_PG_INSERT_RUNS = pg_bulk.insert_select(
    t.runs,
    _PG_NEW_RUN_ROWS,
    {name: _PG_NEW_RUN_ROWS.value(name) for name in _RUN_COLUMNS},
    order_by="i",  # see _write_runs
    suffix="ON CONFLICT DO NOTHING",
    once=f"pg_notify('{NOTIFY_CHANNEL}', 'run')",
).execution_options(preserve_rowcount=True)
_PG_INSERT_CLAIMED_RUNS = pg_bulk.insert_select(
    t.runs,
    _PG_NEW_RUN_ROWS,
    {name: _PG_NEW_RUN_ROWS.value(name) for name in _RUN_COLUMNS},
    order_by="i",
    suffix="ON CONFLICT DO NOTHING",
).execution_options(preserve_rowcount=True)
"""``_PG_INSERT_RUNS`` without the NOTIFY: runs inserted already claimed are no
claimable work for other workers."""
_INSERT_OUTBOX = sa.insert(t.outbox)
_NOTIFY = {kind: sa.text(f"NOTIFY {NOTIFY_CHANNEL}, '{kind}'") for kind in ("run", "jobs")}
_PG_NOTIFY_ENDED = sa.text(f"SELECT pg_notify('{NOTIFY_CHANNEL}', :payload)")
_PG_NOTIFY_DUE = _PG_NOTIFY_ENDED  # the same statement, with a ``due:`` payload
_GET_IDEMPOTENCY = sa.select(t.idempotency_keys).where(
    t.idempotency_keys.c.key == sa.bindparam("key"),
    t.idempotency_keys.c.command_type == sa.bindparam("command_type"),
)


class SqlTransaction:
    """A unit of work on one connection; see the module docstring for the rules."""

    def __init__(
        self,
        connection: AsyncConnection,
        dialect_name: str,
        payloads: PayloadOffload | None = None,
    ) -> None:
        self.connection = connection
        self.dialect_name = dialect_name
        self.active = True
        self.payloads = payloads
        self.created_blobs: list[str] = []
        """Blob keys this transaction wrote to an external store (deleted on rollback)."""
        self._offloaded: dict[int, tuple[Any, Any]] = {}
        self._notified: set[str] = set()
        self._fresh: dict[str, set[str]] = {}
        """Runs this transaction inserted, each with the stage ids it gave them: their
        stages need no lookup of existing ones (see ``insert_stages``)."""
        self.ended_runs: list[str] | None = None
        """Runs this transaction finished (``RUN_END_EVENTS``): told to the persistence's
        run-end watchers once it commits."""
        self.final_runs: dict[str, Run] | None = None
        """The terminal runs this transaction wrote, as written: told along with
        ``ended_runs``, so a waiter in this process needs no read for the outcome."""
        self.due: dict[DueKind, datetime] | None = None
        """The earliest due time per kind this transaction wrote (``note_due``): sent as
        one NOTIFY before it commits, told to the due watchers after."""

    @property
    def flow(self) -> SqlFlowControl:
        """The FlowControl concern (``ports.flow_control``) on this transaction."""
        return SqlFlowControl(self)

    # -- plumbing ----------------------------------------------------------------
    @property
    def retention(self) -> SqlRetention:
        """Purging expired runs in this transaction (``adapters/sql/retention.py``)."""
        return SqlRetention(self)

    @property
    def is_postgres(self) -> bool:
        return self.dialect_name == "postgresql"

    def _check(self) -> None:
        if not self.active:
            raise TreadleError("transaction used after it ended")

    async def execute(
        self, statement: sa.Executable, what: str = "query", parameters: Any = None
    ) -> sa.CursorResult[*tuple[Any, ...]]:
        """Run ``statement`` on this transaction's connection, translating driver errors.
        ``parameters``: a dict, or a list of dicts for an executemany (batched INSERT)."""
        self._check()
        try:
            return await self.connection.execute(statement, parameters)
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc, what) from exc

    async def notify(self, payload: str) -> None:
        """``NOTIFY treadle_jobs, payload`` on PostgreSQL (delivered on commit), at most
        once per payload and transaction: PostgreSQL would fold duplicates anyway, but
        each statement is a round trip. A no-op on SQLite, whose workers poll."""
        if not self.is_postgres or payload in self._notified:
            return
        self._notified.add(payload)
        await self.execute(_NOTIFY[payload], "notify")

    def note_due(self, kind: DueKind, when: datetime) -> None:
        """This transaction writes timed work of ``kind`` due at ``when`` (see
        ``adapters/due_times.py``). Only the earliest per kind is kept, so a transaction
        sends at most one NOTIFY however much timed work it writes."""
        if self.due is None:
            self.due = {}
        earliest(self.due, kind, when)

    def prepared(self, name: str, build: Callable[[SqlTransaction], Any]) -> Any:
        """The statement ``build(self)`` makes, built once per dialect and reused.

        A statement object built per call costs SQLAlchemy a cache-key walk (about
        100 us for a wide table) before its compiled form is found; the hot-path
        statements are therefore built once with ``bindparam``s and executed with
        parameters. ``build`` must depend on nothing but the dialect."""
        key = (self.dialect_name, name)
        statement = _PREPARED.get(key)
        if statement is None:
            statement = _PREPARED[key] = build(self)
        return statement

    # -- payload offload (payloads.py): large JSON values live in the BlobStore, and user
    # values shaped like a reference are escaped, whether or not offload is configured.
    async def _put_payload(self, scope: str | None, value: Any) -> Any:
        """What a JSON column stores for ``value``: itself, escaped, or a reference."""
        if value is None:
            return value
        known = self._offloaded.get(id(value))
        if known is not None and known[0] is value:  # read back in this transaction
            return known[1]
        if type(value) is MissingPayload:  # its blob is gone: the reference it was read from
            return reference_of(value)
        value = escape(value)
        if self.payloads is None:
            return value
        return await self.payloads.store_value(self, scope, value)

    async def _get_payload(self, value: Any, run_id: str | None) -> Any:
        """The value a JSON column's stored ``value`` stands for; ``PayloadMissingError``
        if it was offloaded and its blob is gone."""
        if is_ref(value):
            if self.payloads is None:
                raise StorageError(
                    f"payload {value!r} was offloaded to a blob store, but this persistence "
                    "has none configured (SqlPersistence.offload_payloads)"
                )
            value = await self.payloads.load_value(self, value, run_id)
        return unescape(value)

    async def _load_payloads(
        self, data: dict[str, Any], columns: Sequence[str], run_id: str
    ) -> dict[str, Any]:
        """Decode the payload columns of ``data``, a run's or stage's row; returns {column:
        stored form} for each it changed. A blob that is gone gives a ``MissingPayload``
        rather than an error: one run's lost blob must not fail a read of many."""
        refs: dict[str, Any] = {}
        for column in columns:
            stored = data[column]
            if is_encoded(stored):
                refs[column] = stored
                try:
                    data[column] = await self._get_payload(stored, run_id)
                except PayloadMissingError:
                    data[column] = missing(stored, run_id)
        return refs

    def _remember(self, model: Any, refs: dict[str, Any], columns: Sequence[str]) -> None:
        """Note what each payload column of ``model`` is stored as, so writing the same
        object back in this transaction (``update_run`` rewrites the input every time)
        neither re-encodes nor re-measures it."""
        for column in columns:
            value = getattr(model, column)
            if value is not None:
                self._offloaded[id(value)] = (value, refs.get(column, value))

    async def _run_from(self, row: sa.Row[Any]) -> Run:
        return await self.run_from_columns(dict(row._mapping))

    async def run_from_columns(self, data: dict[str, Any]) -> Run:
        """The run of a ``runs`` row given as a dict of its columns (a joined read)."""
        refs = await self._load_payloads(data, _RUN_PAYLOADS, data["id"])
        run = Run.model_validate(data)
        self._remember(run, refs, _RUN_PAYLOADS)
        return run

    async def _run_row(self, run: Run) -> dict[str, Any]:
        values = _run_values(run)
        for column in _RUN_PAYLOADS:
            values[column] = await self._put_payload(run.id, values[column])
        return values

    async def _stage_from(self, row: sa.Row[Any]) -> StageRun:
        return await self.stage_from_columns(dict(row._mapping))

    async def stage_from_columns(self, data: dict[str, Any]) -> StageRun:
        """The stage of a ``stages`` row given as a dict of its columns (a joined read)."""
        refs = await self._load_payloads(data, _STAGE_PAYLOADS, data["run_id"])
        stage = _stage_from_columns(data)
        self._remember(stage, refs, _STAGE_PAYLOADS)
        return stage

    async def _stage_row(self, stage: StageRun) -> dict[str, Any]:
        values = _stage_values(stage)
        for column in _STAGE_PAYLOADS:
            values[column] = await self._put_payload(stage.workflow_run_id, values[column])
        return values

    async def _outbox_from(self, row: sa.Row[Any]) -> OutboxRecord:
        """The record of an outbox row; ``PayloadMissingError`` if its event's blob is gone."""
        if not is_encoded(row.event):
            return _outbox_record(row)
        return OutboxRecord.model_construct(
            id=int(row.id),
            event=cast(Any, parse_event(await self._get_payload(row.event, row.run_id))),
            attempts=int(row.attempts),
            published=bool(row.published),
            dead_lettered=bool(row.dead_lettered),
            last_error=row.last_error,
        )

    def insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT construct (it has ``on_conflict_do_*``)."""
        if self.is_postgres:
            return postgresql.insert(table)
        return sqlite.insert(table)

    def any_of(self, column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
        """``column`` is one of the list bound as ``name``. On PostgreSQL one array
        parameter (``= ANY(:name)``): the statement's text is the same for every length,
        so psycopg converts it once and the server keeps one prepared statement, where an
        expanding ``IN`` list makes a new statement of every length. SQLite has no
        arrays: an expanding ``IN``."""
        if self.is_postgres:
            array = postgresql.ARRAY(column.type)
            return column == sa.any_(sa.bindparam(name, type_=array))
        return column.in_(sa.bindparam(name, expanding=True))

    def _lock(self, query: sa.Select[Any], *, skip_locked: bool = False) -> sa.Select[Any]:
        # SQLite has no row locks: BEGIN IMMEDIATE already holds the database write lock.
        if self.is_postgres:
            return query.with_for_update(skip_locked=skip_locked)
        return query

    def _attribute_equals(self, column: sa.ColumnElement[Any], key: str, value: Any) -> Any:
        """``column[key] == value`` for a JSON object column, with the key required."""
        encoded = json.dumps(value)
        if self.is_postgres:
            return column.op("->")(sa.literal(key, sa.String())) == sa.cast(
                sa.literal(encoded, sa.String()), postgresql.JSONB()
            )
        return _sqlite_json_equals(column, '$."' + key.replace('"', '\\"') + '"', value)

    # -- runs -------------------------------------------------------------------
    async def insert_run(self, run: Run) -> None:
        written, _ = await self._write_runs([run], "insert run")
        if written == 1:
            return
        exists = await self.execute(sa.select(t.runs.c.id).where(t.runs.c.id == run.id))
        if exists.first() is not None:
            raise DuplicateError(f"run {run.id!r} already exists")
        raise DuplicateError(
            f"a {run.workflow_id!r} run with key {run.idempotency_key!r} already exists"
        )

    async def insert_runs(self, runs: Sequence[Run]) -> None:
        self._check()
        if not runs:
            return
        written, rows = await self._write_runs(runs, "insert runs")
        if written != len(runs):
            raise DuplicateError(
                f"run(s) {', '.join(await self._not_inserted(runs, rows))} already exist "
                "(the same id, or the same workflow and idempotency key)"
            )

    async def _write_runs(self, runs: Sequence[Run], what: str) -> tuple[int, list[dict[str, Any]]]:
        """Insert ``runs``, skipping any that conflict (so a duplicate does not poison a
        PostgreSQL transaction); returns how many it wrote, and the rows it sent.

        PostgreSQL: one statement of one JSON parameter (pg_bulk.py) that also sends
        ``NOTIFY treadle_jobs, 'run'`` (delivered on commit: a PENDING run is claimable
        work; none for runs inserted already claimed), so a ``run.create`` pays no round
        trip of its own for the wake-up. The rows
        go in key order: two transactions inserting overlapping keys (or ids) take them
        in the same order, so one waits for the other instead of deadlocking. SQLite:
        the prebuilt insert, executed many times for many rows; its workers poll."""
        rows = [await self._run_row(run) for run in runs]
        if self.is_postgres:
            for i, row in enumerate(sorted(rows, key=_new_run_order)):
                row["i"] = i
            if any(run.status is RunStatus.PENDING for run in runs):
                statement = _PG_INSERT_RUNS
                self._notified.add("run")
            else:
                statement = _PG_INSERT_CLAIMED_RUNS
            result = await self.execute(statement, what, _PG_NEW_RUN_ROWS.encode(rows))
        else:
            stmt = self.prepared("insert_run", _insert_run_statement)
            result = await self.execute(stmt, what, rows[0] if len(rows) == 1 else rows)
        if result.rowcount == len(runs):
            for run in runs:
                self._fresh[run.id] = set()
        return int(result.rowcount), rows

    async def _not_inserted(self, runs: Sequence[Run], rows: list[dict[str, Any]]) -> list[str]:
        """After ``insert_runs`` wrote fewer rows than it had: the ids of those it did not
        write (a row stored under the id that differs from the one sent; see
        ``_not_written``)."""
        query = sa.select(t.runs).where(t.runs.c.id.in_([run.id for run in runs]))
        stored = {row.id: row._mapping for row in await self.execute(query, "insert runs")}
        seen: set[str] = set()
        items = []
        for run, values in zip(runs, rows, strict=True):
            # The second occurrence of an id in the call is never the one written.
            found = None if run.id in seen else stored.get(run.id)
            seen.add(run.id)
            items.append((repr(run.id), found, values))
        return _not_written(items)

    async def find_runs_by_keys(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Run]:
        self._check()
        wanted = set(keys)
        if not wanted:
            return {}

        def build(tx: SqlTransaction) -> Any:
            c = t.runs.c
            # Both columns of the unique index: a superset of the pairs, filtered below.
            return sa.select(t.runs).where(
                tx.any_of(c.workflow_id, "workflow_ids"), tx.any_of(c.idempotency_key, "keys")
            )

        params = {
            "workflow_ids": sorted({w for w, _ in wanted}),
            "keys": sorted({k for _, k in wanted}),
        }
        rows = await self.execute(self.prepared("find_runs_by_keys", build), "find runs", params)
        found: dict[tuple[str, str], Run] = {}
        for row in rows:
            key = (row.workflow_id, row.idempotency_key)
            if key in wanted:
                found[key] = await self._run_from(row)
        return found

    async def get_run(self, run_id: str, *, for_update: bool = False) -> Run | None:
        query = _GET_RUN
        if for_update:
            query = self.prepared("get_run_for_update", lambda tx: tx._lock(_GET_RUN))
        row = (await self.execute(query, "get run", {"run_id": run_id})).first()
        return await self._run_from(row) if row is not None else None

    async def find_run_by_key(self, workflow_id: str, idempotency_key: str) -> Run | None:
        query = sa.select(t.runs).where(
            t.runs.c.workflow_id == workflow_id, t.runs.c.idempotency_key == idempotency_key
        )
        row = (await self.execute(query, "find run by key")).first()
        return await self._run_from(row) if row is not None else None

    async def update_run(self, run: Run) -> Run:
        new = evolve(run, {"version": run.version + 1, "stages": []})
        values = await self._run_row(new)
        del values["id"]
        values["w_id"], values["w_version"] = run.id, run.version
        result = await self.execute(_UPDATE_RUN, "update run", values)
        if result.rowcount == 1:
            if new.status.terminal:
                self._note_final(new)
            return new
        stored = (
            await self.execute(sa.select(t.runs.c.version).where(t.runs.c.id == run.id))
        ).first()
        if stored is None:
            raise ConcurrencyError(f"run {run.id!r} does not exist")
        raise ConcurrencyError(
            f"run {run.id!r} was updated concurrently (version {stored.version}, "
            f"expected {run.version})"
        )

    # -- set-oriented forms (see the port): one round trip each in the normal case.
    async def get_runs(self, run_ids: Sequence[str], *, for_update: bool = False) -> dict[str, Run]:
        self._check()
        if not run_ids:
            return {}

        def build(tx: SqlTransaction) -> Any:
            query = (
                sa.select(t.runs)
                .where(tx.any_of(t.runs.c.id, "run_ids"))
                .order_by(t.runs.c.id)  # with FOR UPDATE: locks taken in id order
            )
            return tx._lock(query) if for_update else query

        query = self.prepared(f"get_runs:{for_update}", build)
        params = {"run_ids": list(dict.fromkeys(run_ids))}
        rows = await self.execute(query, "get runs", params)
        return {row.id: await self._run_from(row) for row in rows}

    async def update_runs(self, runs: Sequence[Run]) -> list[Run]:
        self._check()
        if not runs:
            return []
        _reject_duplicates([run.id for run in runs], "run")
        new = [evolve(run, {"version": run.version + 1, "stages": []}) for run in runs]
        rows: list[dict[str, Any]] = []
        for run, updated in zip(runs, new, strict=True):
            values = await self._run_row(updated)
            del values["id"]
            values["w_id"], values["w_version"] = run.id, run.version
            rows.append(values)
        # One statement on PostgreSQL (UPDATE ... FROM: its rowcount counts the rows it
        # updated); one executemany on SQLite (the summed rowcount, which SQLAlchemy's
        # supports_sane_multi_rowcount vouches for). A short count means a stale or
        # missing run.
        if self.is_postgres:
            encoded: dict[str, Any] = _PG_RUN_ROWS.encode(sorted(rows, key=_by_run_key))
            encoded["keys"] = sorted(run.id for run in runs)
            result = await self.execute(_PG_UPDATE_RUNS, "update runs", encoded)
        else:
            result = await self.execute(_UPDATE_RUN, "update runs", rows)
        if result.rowcount != len(rows):
            params = {"run_ids": [r.id for r in runs]}
            stored = {
                row.id: row._mapping for row in await self.execute(_GET_RUNS, "update runs", params)
            }
            stale = _not_written(
                [
                    (run.id, stored.get(run.id), values)
                    for run, values in zip(runs, rows, strict=True)
                ]
            )
            raise ConcurrencyError(
                f"run(s) {', '.join(map(repr, stale))} were updated concurrently or do not exist"
            )
        for run in new:
            if run.status.terminal:
                self._note_final(run)
        return new

    def _note_final(self, run: Run) -> None:
        if self.final_runs is None:
            self.final_runs = {}
        self.final_runs[run.id] = run

    def _run_conditions(self, f: RunFilter) -> list[Any]:
        c = t.runs.c
        conditions: list[Any] = []
        if f.status is not None:
            conditions.append(c.status == f.status.value)
        if f.statuses:
            conditions.append(c.status.in_(sorted(s.value for s in f.statuses)))
        if f.workflow_id is not None:
            conditions.append(c.workflow_id == f.workflow_id)
        if f.created_after is not None:
            conditions.append(c.created_at >= f.created_after)
        if f.created_before is not None:
            conditions.append(c.created_at < f.created_before)
        if f.parent_run_id is not None:
            conditions.append(c.parent_run_id == f.parent_run_id)
        if f.paused is not None:
            live = c.status.in_([s.value for s in RunStatus if not s.terminal])
            paused = sa.and_(c.paused.is_(True), live)
            conditions.append(paused if f.paused else sa.not_(paused))
        conditions.extend(self._attribute_filter(c.search_attributes, f.attributes))
        return conditions

    def _attribute_filter(
        self, column: sa.ColumnElement[Any], attributes: Mapping[str, Any]
    ) -> list[Any]:
        """Every ``column[key] == value``. On PostgreSQL one containment test
        (``search_attributes @> '{...}'``) that the GIN index ``ix_runs_search_attributes``
        serves; containment equals equality for scalars, and is implied by it for objects
        and arrays, which therefore also get an exact comparison."""
        if not attributes:
            return []
        if not self.is_postgres:
            return [self._attribute_equals(column, k, v) for k, v in attributes.items()]
        contains = column.op("@>")(
            sa.cast(sa.literal(json.dumps(dict(attributes)), sa.String()), postgresql.JSONB())
        )
        exact = [
            self._attribute_equals(column, k, v)
            for k, v in attributes.items()
            if isinstance(v, list | tuple | dict)
        ]
        return [contains, *exact]

    async def list_runs(self, filter: RunFilter) -> list[Run]:
        query = (
            sa.select(t.runs)
            .where(*self._run_conditions(filter))
            .order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc())
            .offset(filter.offset)
            .limit(filter.limit)
        )
        return [await self._run_from(row) for row in await self.execute(query, "list runs")]

    async def count_runs(self, group_by: str, filter: RunFilter) -> dict[str, int]:
        if group_by not in ("status", "workflow_id"):
            raise ValueError(f"cannot group runs by {group_by!r}")
        column = t.runs.c[group_by]
        query = (
            sa.select(column, sa.func.count()).where(*self._run_conditions(filter)).group_by(column)
        )
        return {str(row[0]): int(row[1]) for row in await self.execute(query, "count runs")}

    async def claim_pending_runs(
        self,
        limit: int,
        *,
        exclude_ids: Sequence[str] = (),
        exclude_keys: Sequence[tuple[str, str | None]] = (),
    ) -> list[Run]:
        if exclude_ids or exclude_keys:
            return await self._claim_pending_excluding(limit, exclude_ids, exclude_keys)

        def build(tx: SqlTransaction) -> Any:
            query = (
                sa.select(t.runs)
                .where(t.runs.c.status == RunStatus.PENDING.value, t.runs.c.paused.is_(False))
                .order_by(t.runs.c.priority.desc(), t.runs.c.created_at, t.runs.c.id)
                .limit(sa.bindparam("limit", type_=sa.Integer()))
            )
            return tx._lock(query, skip_locked=True)

        # Built once: a worker whose slots free one by one claims once per freed slot.
        query = self.prepared("claim_pending_runs", build)
        rows = await self.execute(query, "claim pending runs", {"limit": limit})
        return [await self._run_from(row) for row in rows]

    async def _claim_pending_excluding(
        self,
        limit: int,
        exclude_ids: Sequence[str],
        exclude_keys: Sequence[tuple[str, str | None]],
    ) -> list[Run]:
        """A claim's later pass, past the runs it already holds and the flow-control
        keys it found full (``None`` key: the whole workflow). Rare: not prepared."""
        c = t.runs.c
        conditions: list[Any] = [c.status == RunStatus.PENDING.value, c.paused.is_(False)]
        if exclude_ids:
            conditions.append(c.id.not_in(list(exclude_ids)))
        whole = sorted({wf for wf, key in exclude_keys if key is None})
        if whole:
            conditions.append(c.workflow_id.not_in(whole))
        for wf, key in exclude_keys:
            if key is not None:
                conditions.append(sa.not_(sa.and_(c.workflow_id == wf, c.concurrency_key == key)))
        query = (
            sa.select(t.runs)
            .where(*conditions)
            .order_by(c.priority.desc(), c.created_at, c.id)
            .limit(limit)
        )
        rows = await self.execute(self._lock(query, skip_locked=True), "claim pending runs")
        return [await self._run_from(row) for row in rows]

    async def runs_inactive_since(
        self, status: RunStatus, cutoff: datetime, limit: int
    ) -> list[Run]:
        query = (
            sa.select(t.runs)
            .where(
                t.runs.c.status == status.value,
                t.runs.c.updated_at < cutoff,
                t.runs.c.paused.is_(False),  # idle on purpose
            )
            .order_by(t.runs.c.updated_at, t.runs.c.id)
            .limit(limit)
        )
        return [await self._run_from(row) for row in await self.execute(query, "inactive runs")]

    # -- stages -----------------------------------------------------------------
    async def insert_stages(self, stages: Sequence[StageRun]) -> None:
        self._check()
        if not stages:
            return
        ordinals = await self._ordinals_of_new(stages)
        if self.is_postgres:
            await self._insert_stages_pg(stages, ordinals)
        else:
            rows = []
            for stage, ordinal in zip(stages, ordinals, strict=True):
                values = await self._stage_row(stage)
                values["ordinal"] = ordinal
                rows.append(values)
            await self.execute(_INSERT_STAGE, "insert stages", rows)
        for stage in stages:
            if stage.workflow_run_id in self._fresh:
                self._fresh[stage.workflow_run_id].add(stage.stage_id)

    async def _ordinals_of_new(self, stages: Sequence[StageRun]) -> list[int]:
        """Each new stage's ordinal (its run's next); ``DuplicateError`` for a missing run
        or a stage id the run has. Stages of runs this transaction inserted need no
        read (``run.create``: it knows their stages); others take one."""
        next_ordinal: dict[str, int] = {}
        existing: set[tuple[str, str]] = set()
        fresh = self._fresh
        if all(s.workflow_run_id in fresh for s in stages):
            for run_id in dict.fromkeys(s.workflow_run_id for s in stages):
                next_ordinal[run_id] = len(fresh[run_id])
                existing.update((run_id, stage_id) for stage_id in fresh[run_id])
        else:
            params = {
                "run_ids": list(dict.fromkeys(s.workflow_run_id for s in stages)),
                "stage_ids": list(dict.fromkeys(s.stage_id for s in stages)),
            }
            slots = await self.execute(_STAGE_SLOTS, "insert stages", params)
            for run_id, highest, stage_id in slots:
                next_ordinal[run_id] = int(highest) + 1
                if stage_id is not None:
                    existing.add((run_id, stage_id))
        ordinals: list[int] = []
        for stage in stages:
            run_id = stage.workflow_run_id
            if run_id not in next_ordinal:
                raise DuplicateError(f"run {run_id!r} does not exist")
            key = (run_id, stage.stage_id)
            if key in existing:
                raise DuplicateError(f"stage {stage.stage_id!r} of run {run_id!r} already exists")
            existing.add(key)
            ordinals.append(next_ordinal[run_id])
            next_ordinal[run_id] += 1
        return ordinals

    async def _insert_stages_pg(self, stages: Sequence[StageRun], ordinals: list[int]) -> None:
        """One statement of one JSON parameter (a psycopg executemany is a statement per
        row). Stages as ``run.create`` makes them (PENDING, nothing else set) send only
        their keys; the statement fills in the rest.

        Each row's foreign key check runs a query the server plans once per session and
        reuses, unless ``plan_cache_mode`` is ``force_custom_plan``, which ``SESSION_OPTIONS``
        sets for the set-oriented writes: then it plans it again for every row (measured,
        3,000 stages on a loaded machine: 459 ms of checks against 83 ms). For a large
        insert (``run.createMany``) the transaction switches to ``auto`` around it."""
        if all(_is_blank(stage) for stage in stages):
            statement, records = _PG_INSERT_BLANK_STAGES, _PG_BLANK_STAGE_ROWS
            rows = [
                {
                    "run_id": stage.workflow_run_id,
                    "stage_id": stage.stage_id,
                    "ordinal": ordinal,
                    "execution_group": stage.execution_group,
                }
                for stage, ordinal in zip(stages, ordinals, strict=True)
            ]
        else:
            statement, records = _PG_INSERT_STAGES, _PG_NEW_STAGE_ROWS
            rows = []
            for stage, ordinal in zip(stages, ordinals, strict=True):
                values = await self._stage_row(stage)
                values["ordinal"] = ordinal
                rows.append(values)
        params = records.encode(rows)
        if len(rows) < _CACHED_CHECKS_FROM:
            await self.execute(statement, "insert stages", params)
            return
        await self.execute(_PLAN_CACHE_AUTO, "insert stages")
        await self.execute(statement, "insert stages", params)
        await self.execute(_PLAN_CACHE_DEFAULT, "insert stages")

    async def get_stages(self, run_id: str) -> list[StageRun]:
        rows = await self.execute(_GET_STAGES, "get stages", {"run_id": run_id})
        return [await self._stage_from(row) for row in rows]

    async def get_stage(self, run_id: str, stage_id: str) -> StageRun | None:
        params = {"run_id": run_id, "stage_id": stage_id}
        row = (await self.execute(_GET_STAGE, "get stage", params)).first()
        return await self._stage_from(row) if row is not None else None

    async def update_stage(self, stage: StageRun) -> StageRun:
        new = evolve(stage, {"version": stage.version + 1})
        values = await self._stage_row(new)
        del values["run_id"], values["stage_id"]
        values["w_run_id"], values["w_stage_id"] = stage.workflow_run_id, stage.stage_id
        values["w_version"] = stage.version
        result = await self.execute(_UPDATE_STAGE, "update stage", values)
        if result.rowcount != 1:
            raise ConcurrencyError(
                f"stage {stage.stage_id!r} of run {stage.workflow_run_id!r} was updated "
                "concurrently"
            )
        self._note_suspended(new)
        return new

    def _note_suspended(self, stage: StageRun) -> None:
        """A stage written SUSPENDED with a next check (or timer) is timed work."""
        if stage.status is StageStatus.SUSPENDED and stage.next_poll_at is not None:
            self.note_due("poll", stage.next_poll_at)

    async def get_stages_of(self, run_ids: Sequence[str]) -> dict[str, list[StageRun]]:
        self._check()
        out: dict[str, list[StageRun]] = {run_id: [] for run_id in run_ids}
        if not out:
            return out
        query = self.prepared(
            "get_stages_of",
            lambda tx: (
                sa.select(t.stages)
                .where(tx.any_of(t.stages.c.run_id, "run_ids"))
                .order_by(t.stages.c.run_id, t.stages.c.execution_group, t.stages.c.ordinal)
            ),
        )
        rows = await self.execute(query, "get stages", {"run_ids": list(out)})
        for row in rows:
            out[row.run_id].append(await self._stage_from(row))
        return out

    async def update_stages(self, stages: Sequence[StageRun]) -> list[StageRun]:
        self._check()
        if not stages:
            return []
        _reject_duplicates([(s.workflow_run_id, s.stage_id) for s in stages], "stage")
        new = [evolve(stage, {"version": stage.version + 1}) for stage in stages]
        rows: list[dict[str, Any]] = []
        for stage, updated in zip(stages, new, strict=True):
            values = await self._stage_row(updated)
            del values["run_id"], values["stage_id"]
            values["w_run_id"], values["w_stage_id"] = stage.workflow_run_id, stage.stage_id
            values["w_version"] = stage.version
            rows.append(values)
        # One statement on PostgreSQL, one executemany on SQLite (see update_runs).
        if self.is_postgres:
            encoded: dict[str, Any] = _PG_STAGE_ROWS.encode(sorted(rows, key=_by_stage_key))
            encoded["keys"] = sorted({stage.workflow_run_id for stage in stages})
            result = await self.execute(_PG_UPDATE_STAGES, "update stages", encoded)
        else:
            result = await self.execute(_UPDATE_STAGE, "update stages", rows)
        if result.rowcount != len(rows):
            params = {
                "run_ids": list({s.workflow_run_id for s in stages}),
                "stage_ids": list({s.stage_id for s in stages}),
            }
            stored = {
                (row.run_id, row.stage_id): row._mapping
                for row in await self.execute(_FIND_STAGES, "update stages", params)
            }
            stale = _not_written(
                [
                    (
                        f"{s.stage_id!r} of run {s.workflow_run_id!r}",
                        stored.get((s.workflow_run_id, s.stage_id)),
                        values,
                    )
                    for s, values in zip(stages, rows, strict=True)
                ]
            )
            raise ConcurrencyError(
                f"stage(s) {', '.join(stale)} were updated concurrently or do not exist"
            )
        for stage in new:
            self._note_suspended(stage)
        return new

    async def due_suspended_stages(self, now: datetime, limit: int) -> list[StageRun]:
        c = t.stages.c
        query = (
            sa.select(t.stages)
            .where(
                c.status == StageStatus.SUSPENDED.value,
                c.next_poll_at.is_not(None),
                c.next_poll_at <= now,
            )
            .order_by(c.next_poll_at, c.run_id, c.stage_id)
            .limit(limit)
        )
        return [await self._stage_from(row) for row in await self.execute(query, "due stages")]

    # -- outbox -----------------------------------------------------------------
    async def _allocate_sequences(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Reserve ``counts[run_id]`` sequence numbers per run; returns each run's first.

        One multi-row upsert (an executemany with RETURNING, which SQLAlchemy sends as
        one INSERT ... VALUES (...), (...) ... ON CONFLICT DO UPDATE ... RETURNING). Its
        rows are in run-id order, so two transactions appending for the same runs lock
        their counters in the same order and cannot deadlock on PostgreSQL."""
        seq = t.run_event_seq

        def build(tx: SqlTransaction) -> Any:
            ins = tx.insert(seq)
            return ins.on_conflict_do_update(
                index_elements=[seq.c.run_id],
                set_={"last_sequence": seq.c.last_sequence + ins.excluded.last_sequence},
            ).returning(seq.c.run_id, seq.c.last_sequence)

        ordered = sorted(counts)
        if self.is_postgres:
            params: Any = _PG_SEQ_ROWS.encode({"run_id": r, "n": counts[r]} for r in ordered)
            stmt = _PG_ALLOCATE_SEQUENCES
        else:
            params = [{"run_id": r, "last_sequence": counts[r]} for r in ordered]
            stmt = self.prepared("allocate_sequences_many", build)
        rows = await self.execute(stmt, "allocate event sequence", params)
        first = {str(run_id): int(last) - counts[run_id] + 1 for run_id, last in rows}
        if first.keys() != counts.keys():
            raise StorageError("allocating event sequences returned other runs than asked")
        return first

    async def append_events(self, events: Sequence[EventBase]) -> list[EventBase]:
        self._check()
        if not events:
            return []
        counts: dict[str, int] = {}
        for event in events:
            counts[event.workflow_run_id] = counts.get(event.workflow_run_id, 0) + 1
        if self.is_postgres:
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
                    "event": await self._put_payload(
                        event.workflow_run_id, event.model_dump(mode="json")
                    ),
                    "created_at": event.timestamp,
                    "published": False,
                    "dead_lettered": False,
                    "attempts": 0,
                }
            )
        ended = self._note_ended(rows)
        if self.is_postgres:
            for i, row in enumerate(rows):
                row["i"] = i
            await self.execute(_PG_INSERT_OUTBOX, "append events", _PG_OUTBOX_ROWS.encode(rows))
            if ended:
                # Waiters in other processes (``RunHandle.result``) hear of it on commit.
                payload = RUN_END_PREFIX + ",".join(dict.fromkeys(ended))
                await self.execute(_PG_NOTIFY_ENDED, "notify run end", {"payload": payload})
        else:
            # A list of parameter sets: one cached statement, batched into one round trip.
            await self.execute(_INSERT_OUTBOX, "append events", rows)
        return stored

    def _note_ended(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """The runs whose end ``rows`` (outbox rows) record, noted for the run-end
        watchers, who are told only once the transaction commits (``ended_runs``)."""
        ended = [row["run_id"] for row in rows if row["event_type"] in RUN_END_EVENTS]
        if ended:
            if self.ended_runs is None:
                self.ended_runs = []
            self.ended_runs.extend(ended)
        return ended

    async def _append_numbering_on_server(
        self, events: Sequence[EventBase], counts: Mapping[str, int]
    ) -> list[EventBase] | None:
        """``append_events`` in one statement (``_pg_append_events``), or ``None`` when
        an event's JSON went to the blob store (the caller's two statements do it)."""
        rows: list[dict[str, Any]] = []
        for i, event in enumerate(events):
            # Asked before anything is stored: an event for the blob store sends the whole
            # append down the two-statement path, which stores it (once) with its number.
            stored = escape(event.model_dump(mode="json"))
            if self.payloads is not None and self.payloads.offloads(stored):
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
        params: dict[str, Any] = _PG_OUTBOX_ROWS.encode(rows)
        ended = self._note_ended(rows)  # told to the watchers only once this commits
        statement = _PG_APPEND_EVENTS
        if ended:
            # Waiters in other processes (``RunHandle.result``) hear of it on commit.
            params["payload"] = RUN_END_PREFIX + ",".join(dict.fromkeys(ended))
            statement = _PG_APPEND_EVENTS_ENDED
        first: dict[str, int] = {}
        for run_id, sequence in await self.execute(statement, "append events", params):
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

    async def unpublished_events(self, limit: int) -> list[OutboxRecord]:
        query = (
            sa.select(t.outbox)
            .where(t.outbox.c.published.is_(False), t.outbox.c.dead_lettered.is_(False))
            .order_by(t.outbox.c.id)
            .limit(limit)
        )
        records: list[OutboxRecord] = []
        for row in await self.execute(query, "unpublished events"):
            try:
                records.append(await self._outbox_from(row))
            except PayloadMissingError as exc:
                # An event whose blob is gone can never be published: dead-lettered now,
                # with the reason, so it neither fails every run's flush nor comes back.
                error = describe_exception(exc)
                await self.record_publish_failure(row.id, error, dead_letter=True)
        return records

    async def mark_published(self, outbox_ids: Sequence[int]) -> None:
        self._check()
        if not outbox_ids:
            return
        stmt = (
            sa.update(t.outbox)
            .where(t.outbox.c.id.in_(list(outbox_ids)))
            .values(published=True, dead_lettered=False, published_at=datetime.now(UTC))
        )
        await self.execute(stmt, "mark published")

    async def record_publish_failure(
        self, outbox_id: int, error: str, *, dead_letter: bool
    ) -> None:
        values: dict[str, Any] = {"attempts": t.outbox.c.attempts + 1, "last_error": error}
        if dead_letter:
            values["dead_lettered"] = True
        stmt = sa.update(t.outbox).where(t.outbox.c.id == outbox_id).values(values)
        await self.execute(stmt, "record publish failure")

    async def dead_lettered_events(self, limit: int) -> list[OutboxRecord]:
        query = (
            sa.select(t.outbox)
            .where(t.outbox.c.published.is_(False), t.outbox.c.dead_lettered.is_(True))
            .order_by(t.outbox.c.id)
            .limit(limit)
        )
        records: list[OutboxRecord] = []
        for row in await self.execute(query, "dead letters"):
            # One whose event's blob is gone cannot be replayed; its row keeps the reason.
            with suppress(PayloadMissingError):
                records.append(await self._outbox_from(row))
        return records

    async def requeue_dead_letters(self, outbox_ids: Sequence[int]) -> int:
        self._check()
        if not outbox_ids:
            return 0
        stmt = (
            sa.update(t.outbox)
            .where(
                t.outbox.c.id.in_(list(outbox_ids)),
                t.outbox.c.published.is_(False),
                t.outbox.c.dead_lettered.is_(True),
            )
            .values(dead_lettered=False, attempts=0)
        )
        # The condition is re-checked under the row lock: of two concurrent replays of a
        # row, one counts it.
        return int((await self.execute(stmt, "requeue dead letters")).rowcount)

    async def events_for_run(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        query = (
            sa.select(t.outbox.c.event)
            .where(t.outbox.c.run_id == run_id, t.outbox.c.sequence > after_sequence)
            .order_by(t.outbox.c.sequence)
        )
        rows = await self.execute(query, "events for run")
        return [parse_event(await self._get_payload(data, run_id)) for (data,) in rows]

    # -- idempotency ------------------------------------------------------------
    async def get_idempotency(self, key: str, command_type: str) -> IdempotencyRecord | None:
        params = {"key": key, "command_type": command_type}
        row = (await self.execute(_GET_IDEMPOTENCY, "get idempotency", params)).first()
        if row is None:
            return None
        return IdempotencyRecord(
            key=row.key,
            command_type=row.command_type,
            state=IdempotencyState(row.state),
            result=await self._get_payload(row.result, None),
            started_at=row.started_at,
        )

    async def put_idempotency(self, record: IdempotencyRecord) -> None:
        values = {
            "key": record.key,
            "command_type": record.command_type,
            "state": record.state.value,
            "result": await self._put_payload(None, record.result),
            "started_at": record.started_at,
        }
        stmt = self.prepared("put_idempotency", _put_idempotency_statement)
        await self.execute(stmt, "put idempotency", values)

    async def put_idempotency_many(self, records: Sequence[IdempotencyRecord]) -> None:
        self._check()
        # The last record of a key wins, as with successive put_idempotency calls (and a
        # multi-row upsert may not touch one row twice).
        latest = {(r.key, r.command_type): r for r in records}
        if not latest:
            return
        rows = [
            {
                "key": record.key,
                "command_type": record.command_type,
                "state": record.state.value,
                "result": await self._put_payload(None, record.result),
                "started_at": record.started_at,
            }
            for record in latest.values()
        ]
        if self.is_postgres:
            # In key order: two transactions upserting the same keys lock them alike.
            rows.sort(key=lambda row: (row["key"], row["command_type"]))
            params = _PG_IDEMPOTENCY_ROWS.encode(rows)
            await self.execute(_PG_PUT_IDEMPOTENCY, "put idempotency", params)
            return
        stmt = self.prepared("put_idempotency", _put_idempotency_statement)
        await self.execute(stmt, "put idempotency", rows)

    async def delete_idempotency(self, key: str, command_type: str) -> None:
        c = t.idempotency_keys.c
        stmt = sa.delete(t.idempotency_keys).where(c.key == key, c.command_type == command_type)
        await self.execute(stmt, "delete idempotency")

    # -- logs and annotations -----------------------------------------------------
    async def append_logs(self, logs: Sequence[LogRecord]) -> None:
        self._check()
        if not logs:
            return
        rows = [
            {
                "run_id": log.workflow_run_id,
                "stage_id": log.stage_id,
                "level": log.level,
                "message": log.message,
                "fields": log.fields,
                "timestamp": log.timestamp,
            }
            for log in logs
        ]
        await self.execute(sa.insert(t.logs).values(rows), "append logs")

    async def get_logs(self, run_id: str) -> list[LogRecord]:
        query = sa.select(t.logs).where(t.logs.c.run_id == run_id).order_by(t.logs.c.id)
        return [
            LogRecord(
                workflow_run_id=row.run_id,
                stage_id=row.stage_id,
                level=row.level,
                message=row.message,
                fields=row.fields,
                timestamp=row.timestamp,
            )
            for row in await self.execute(query, "get logs")
        ]

    async def insert_annotations(self, annotations: Sequence[Annotation]) -> None:
        self._check()
        if not annotations:
            return
        keyed = [(a.workflow_run_id, a.idempotency_key) for a in annotations if a.idempotency_key]
        taken: set[tuple[str, str]] = set()
        if keyed:
            c = t.annotations.c
            query = sa.select(c.run_id, c.idempotency_key).where(
                c.run_id.in_({r for r, _ in keyed}),
                c.idempotency_key.in_({k for _, k in keyed}),
            )
            taken = {(row.run_id, row.idempotency_key) for row in await self.execute(query)}
        rows: list[dict[str, Any]] = []
        for annotation in annotations:
            if annotation.idempotency_key is not None:
                key = (annotation.workflow_run_id, annotation.idempotency_key)
                if key in taken:
                    raise DuplicateError(
                        f"annotation key {annotation.idempotency_key!r} already used on run "
                        f"{annotation.workflow_run_id!r}"
                    )
                taken.add(key)
            rows.append(
                {
                    "id": annotation.id,
                    "run_id": annotation.workflow_run_id,
                    "attributes": annotation.attributes,
                    "actor": annotation.actor,
                    "scope": annotation.scope,
                    "stage_id": annotation.stage_id,
                    "idempotency_key": annotation.idempotency_key,
                    "created_at": annotation.created_at,
                }
            )
        await self.execute(sa.insert(t.annotations).values(rows), "insert annotations")

    async def find_annotation(self, run_id: str, idempotency_key: str) -> Annotation | None:
        c = t.annotations.c
        query = sa.select(t.annotations).where(
            c.run_id == run_id, c.idempotency_key == idempotency_key
        )
        row = (await self.execute(query, "find annotation")).first()
        return _annotation_from_row(row) if row is not None else None

    async def list_annotations(
        self,
        run_id: str,
        *,
        key: str | None = None,
        key_prefix: str | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> list[Annotation]:
        c = t.annotations.c
        query = sa.select(t.annotations).where(c.run_id == run_id).order_by(c.seq)
        if scope is not None:
            query = query.where(c.scope == scope)
        if key is None and key_prefix is None:
            query = query.limit(limit)
        out: list[Annotation] = []
        # Key filters run here, not in SQL: exact, case-sensitive prefix semantics on both
        # dialects (SQLite's LIKE ignores case), over one run's (few) annotations.
        for row in await self.execute(query, "list annotations"):
            attributes: Mapping[str, Any] = row.attributes
            if key is not None and key not in attributes:
                continue
            if key_prefix is not None and not any(k.startswith(key_prefix) for k in attributes):
                continue
            out.append(_annotation_from_row(row))
            if len(out) >= limit:
                break
        return out

    # -- code workflows: journal, signal inbox, timers ------------------------------------
    # Inserts use ON CONFLICT DO NOTHING ... RETURNING (both dialects), so a duplicate is a
    # DuplicateError that does not poison a PostgreSQL transaction; consuming a signal and
    # firing a timer are conditional UPDATEs, so neither can happen twice.
    async def get_journal(
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
        rows = await self.execute(query, "get journal")
        return [await self._journal_from(row) for row in rows]

    async def get_journal_entry(
        self, run_id: str, name: str, occurrence: int
    ) -> JournalEntry | None:
        c = t.journal.c
        query = sa.select(t.journal).where(
            c.run_id == run_id, c.step_name == name, c.occurrence == occurrence
        )
        row = (await self.execute(query, "get journal entry")).first()
        return await self._journal_from(row) if row is not None else None

    async def latest_journal_entry(self, run_id: str, name: str) -> JournalEntry | None:
        c = t.journal.c
        query = (
            sa.select(t.journal)
            .where(c.run_id == run_id, c.step_name == name)
            .order_by(c.occurrence.desc())
            .limit(1)
        )
        row = (await self.execute(query, "latest journal entry")).first()
        return await self._journal_from(row) if row is not None else None

    async def _journal_from(self, row: sa.Row[Any]) -> JournalEntry:
        entry = _journal_from_row(row)
        if is_encoded(entry.input) or is_encoded(entry.result):
            run_id = entry.workflow_run_id
            loaded = {
                "input": await self._get_payload(entry.input, run_id),
                "result": await self._get_payload(entry.result, run_id),
            }
            entry = evolve(entry, loaded)
        return entry

    async def _journal_row(self, entry: JournalEntry) -> dict[str, Any]:
        values = _journal_values(entry)
        for column in ("input", "result"):
            values[column] = await self._put_payload(entry.workflow_run_id, values[column])
        return values

    async def _inbox_from(self, row: sa.Row[Any]) -> InboxMessage:
        message = _inbox_from_row(row)
        if is_encoded(message.payload) or is_encoded(message.reply):
            run_id = message.workflow_run_id
            loaded = {
                "payload": await self._get_payload(message.payload, run_id),
                "reply": await self._get_payload(message.reply, run_id),
            }
            message = evolve(message, loaded)
        return message

    async def insert_journal_entry(self, entry: JournalEntry) -> JournalEntry:
        values = await self._journal_row(entry)
        values["version"] = 0
        stmt = (
            self.insert(t.journal).values(values).on_conflict_do_nothing().returning(t.journal.c.id)
        )
        row = (await self.execute(stmt, "insert journal entry")).first()
        if row is None:
            raise DuplicateError(
                f"journal of run {entry.workflow_run_id!r} already has {entry.name!r} "
                f"#{entry.occurrence} or position {entry.position}"
            )
        return evolve(entry, {"id": int(row[0]), "version": 0})

    async def update_journal_entry(self, entry: JournalEntry) -> JournalEntry:
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
        row = (await self.execute(stmt, "update journal entry")).first()
        if row is None:
            raise ConcurrencyError(
                f"journal entry {entry.name!r} #{entry.occurrence} of run "
                f"{entry.workflow_run_id!r} was updated concurrently"
            )
        return evolve(entry, {"id": int(row[0]), "version": entry.version + 1})

    async def insert_signal(self, message: InboxMessage) -> InboxMessage:
        stmt = (
            self.insert(t.signal_inbox)
            .values(
                run_id=message.workflow_run_id,
                kind=message.kind,
                name=message.name,
                payload=await self._put_payload(message.workflow_run_id, message.payload),
                update_id=message.update_id,
                reply=await self._put_payload(message.workflow_run_id, message.reply),
                idempotency_key=message.idempotency_key,
                created_at=message.created_at,
                consumed_at=message.consumed_at,
                consumed_by_step=message.consumed_by,
            )
            .on_conflict_do_nothing()
            .returning(t.signal_inbox.c.id)
        )
        row = (await self.execute(stmt, "insert signal")).first()
        if row is None:
            raise DuplicateError(
                f"run {message.workflow_run_id!r} already received a message with key "
                f"{message.idempotency_key!r}"
            )
        return evolve(message, {"id": int(row[0])})

    async def next_signal(
        self, run_id: str, name: str, *, kind: str = "signal"
    ) -> InboxMessage | None:
        c = t.signal_inbox.c
        query = (
            sa.select(t.signal_inbox)
            .where(
                c.run_id == run_id,
                c.name == name,
                c.kind == kind,
                c.consumed_at.is_(None),
            )
            .order_by(c.id)
            .limit(1)
        )
        row = (await self.execute(query, "next signal")).first()
        return await self._inbox_from(row) if row is not None else None

    async def consume_signal(
        self, message_id: int, consumed_at: datetime, consumed_by: str
    ) -> None:
        c = t.signal_inbox.c
        stmt = (
            sa.update(t.signal_inbox)
            .where(c.id == message_id, c.consumed_at.is_(None))
            .values(consumed_at=consumed_at, consumed_by_step=consumed_by)
        )
        if (await self.execute(stmt, "consume signal")).rowcount != 1:
            raise ConcurrencyError(f"inbox message {message_id} was consumed already")

    async def list_signals(self, run_id: str) -> list[InboxMessage]:
        c = t.signal_inbox.c
        query = sa.select(t.signal_inbox).where(c.run_id == run_id).order_by(c.id)
        rows = await self.execute(query, "list signals")
        return [await self._inbox_from(row) for row in rows]

    async def find_update(self, run_id: str, update_id: str) -> InboxMessage | None:
        c = t.signal_inbox.c
        query = sa.select(t.signal_inbox).where(
            c.run_id == run_id, c.kind == "update", c.update_id == update_id
        )
        row = (await self.execute(query, "find update")).first()
        return await self._inbox_from(row) if row is not None else None

    async def set_reply(self, message_id: int, reply: JsonValue) -> None:
        c = t.signal_inbox.c
        stmt = (
            sa.update(t.signal_inbox)
            .where(c.id == message_id, c.reply.is_(None) | (sa.cast(c.reply, sa.Text) == "null"))
            .values(reply=await self._put_payload(None, reply))
        )
        if (await self.execute(stmt, "set reply")).rowcount != 1:
            raise ConcurrencyError(f"update message {message_id} was answered already")

    async def schedule_timer(self, timer: Timer) -> Timer:
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
            self.insert(t.timers)
            .values(values)
            .on_conflict_do_update(
                index_elements=[c.run_id, c.step_name, c.occurrence], set_=replace
            )
            .returning(c.id)
        )
        row = (await self.execute(stmt, "schedule timer")).first()
        assert row is not None
        return evolve(timer, {"id": int(row[0]), "fired_at": None})

    async def pending_timers(self, run_id: str) -> list[Timer]:
        c = t.timers.c
        query = (
            sa.select(t.timers)
            .where(c.run_id == run_id, c.fired_at.is_(None))
            .order_by(c.fire_at, c.id)
        )
        return [_timer_from_row(row) for row in await self.execute(query, "pending timers")]

    async def due_timers(self, now: datetime, limit: int, *, purpose: str) -> list[Timer]:
        c = t.timers.c
        query = (
            sa.select(t.timers)
            .where(c.fired_at.is_(None), c.fire_at <= now, c.kind == purpose)
            .order_by(c.fire_at, c.id)
            .limit(limit)
        )
        return [_timer_from_row(row) for row in await self.execute(query, "due timers")]

    async def fire_timer(self, run_id: str, name: str, occurrence: int, fired_at: datetime) -> bool:
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
        return bool((await self.execute(stmt, "fire timer")).rowcount == 1)


def _insert_run_statement(tx: SqlTransaction) -> Any:
    # ON CONFLICT DO NOTHING: a duplicate does not poison a PostgreSQL transaction; the
    # caller reads the rowcount (which an INSERT reports only when asked to).
    return tx.insert(t.runs).on_conflict_do_nothing().execution_options(preserve_rowcount=True)


def _put_idempotency_statement(tx: SqlTransaction) -> Any:
    ins = tx.insert(t.idempotency_keys)
    return ins.on_conflict_do_update(
        index_elements=["key", "command_type"],
        set_={k: ins.excluded[k] for k in ("state", "result", "started_at")},
    )


def _new_run_order(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """The order ``insert_runs`` writes runs in on PostgreSQL: by the unique keys."""
    return (row["workflow_id"], row["idempotency_key"] or "", row["id"])


def _is_blank(stage: StageRun) -> bool:
    """Whether every column of ``stage`` but its keys holds what ``_BLANK_STAGE`` does."""
    values = stage.__dict__
    return all(
        _plain(values[name]) == blank
        for name, blank in _BLANK_STAGE.items()
        if name not in _STAGE_KEYS and name in values
    )


def _by_run_key(row: Mapping[str, Any]) -> str:
    return str(row["w_id"])


def _by_stage_key(row: Mapping[str, Any]) -> tuple[str, str]:
    return (row["w_run_id"], row["w_stage_id"])


def _reject_duplicates(keys: Sequence[Any], what: str) -> None:
    """``ValueError`` if a key occurs twice in one set-oriented update: its second
    update would always be stale, a caller's bug rather than a concurrent writer."""
    seen: set[Any] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"{what} {key!r} occurs more than once in one call")
        seen.add(key)


def _not_written(
    items: Sequence[tuple[str, Any, Mapping[str, Any]]],
) -> list[str]:
    """After an executemany of optimistic updates updated fewer rows than it had: the
    names of the items it did not write. Each item is (name, the stored row or None,
    the parameters written). A version alone cannot tell: a concurrent writer that won
    moved the row to the very version this call would have written. So a row counts as
    written by the call iff it holds every value the call set (a concurrent writer
    storing exactly the same values is indistinguishable, and harmless to leave out).
    If nothing can be told apart, every item is named."""
    stale = [
        name
        for name, stored, values in items
        if stored is None
        or any(
            not key.startswith("w_") and key in stored and stored[key] != value
            for key, value in values.items()
        )
    ]
    return stale or [name for name, _, _ in items]


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


def _inbox_from_row(row: sa.Row[Any]) -> InboxMessage:
    return InboxMessage(
        id=int(row.id),
        workflow_run_id=row.run_id,
        kind=row.kind,
        name=row.name,
        payload=row.payload,
        update_id=row.update_id,
        reply=row.reply,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
        consumed_at=row.consumed_at,
        consumed_by=row.consumed_by_step,
    )


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


class SqlPersistence:
    """The Persistence port on a SQL database (PostgreSQL or SQLite).

    Build it from an ``AsyncEngine`` you own, or with ``await SqlPersistence.open(url)``,
    which creates (and on ``close()`` disposes) the engine, and can migrate first.
    """

    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = False) -> None:
        self.engine = engine
        self.dialect_name = engine.dialect.name
        self._owns_engine = owns_engine
        self.payloads: PayloadOffload | None = None
        self._write_gate: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self.run_ends = RunEndWatchers()
        self.due_watchers = DueWatchers()
        if self.dialect_name == "sqlite":
            configure_sqlite(engine)
        elif self.dialect_name != "postgresql":
            raise ValueError(f"unsupported SQL dialect {self.dialect_name!r}")

    @classmethod
    async def open(
        cls, url: str | URL, *, migrate: bool = False, **engine_options: Any
    ) -> SqlPersistence:
        """Connect to ``url`` (``sqlite:///file.db``, ``postgresql://...``); with
        ``migrate=True`` bring the schema to the latest revision first."""
        engine = create_engine(url, **engine_options)
        if migrate:
            from treadle.adapters.sql.migrate import migrate_engine

            try:
                await migrate_engine(engine)
            except sa_exc.SQLAlchemyError as exc:
                await engine.dispose()
                raise translate(exc, "migrate") from exc
            except BaseException:
                await engine.dispose()
                raise
        return cls(engine, owns_engine=True)

    @property
    def is_postgres(self) -> bool:
        return self.dialect_name == "postgresql"

    def offload_payloads(self, store: BlobStore, *, max_bytes: int | None) -> None:
        """Store JSON payloads larger than ``max_bytes`` in ``store`` (``None``: never, but
        still read references written before). See ``payloads.py``."""
        # A ``SqlBlobStore`` on this persistence (``blob_store.py``, which imports this
        # module): its blob rows are written in the transaction that refers to them.
        same_database = getattr(store, "persistence", None) is self
        self.payloads = PayloadOffload(store, max_bytes, same_database=same_database)

    @asynccontextmanager
    async def transaction(self, *, read_only: bool = False) -> AsyncIterator[SqlTransaction]:
        """``async with persistence.transaction() as tx:`` commits on exit, rolls back on
        error. ``read_only`` lets a SQLite reader skip the write lock."""
        tx: SqlTransaction | None = None
        try:
            async with self.connect(read_only=read_only) as conn:
                tx = SqlTransaction(conn, self.dialect_name, self.payloads)
                try:
                    yield tx
                    if tx.due is not None and tx.is_postgres:
                        # Other processes' workers hear of it on commit (``due_times.py``).
                        payload = {"payload": due_payload(tx.due)}
                        await tx.execute(_PG_NOTIFY_DUE, "notify due times", payload)
                finally:
                    tx.active = False
        except BaseException:
            if tx is not None and tx.created_blobs and self.payloads is not None:
                await self.payloads.discard(tx.created_blobs)  # rolled back: nothing refers
            raise
        if tx.ended_runs is not None:
            self.run_ends.tell(tx.ended_runs, tx.final_runs)
        if tx.due is not None:
            self.due_watchers.tell(tx.due)

    def watch_due(self, callback: DueCallback) -> Callable[[], None]:
        """Call ``callback(due)`` after each commit of this process that wrote timed work
        (see ``DueWatchers``); returns the function that stops it."""
        return self.due_watchers.watch(callback)

    def watch_run_ends(self, callback: RunEndCallback) -> Callable[[], None]:
        """Call ``callback(run_ids, outcomes)`` after each commit that finished runs in
        this process (see ``RunEndWatchers``); returns the function that stops it."""
        return self.run_ends.watch(callback)

    @asynccontextmanager
    async def connect(self, *, read_only: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection inside a begun transaction, with commit/rollback and error translation
        (the job transport's own short transactions use it too).

        SQLite hook: write transactions of this process queue on an asyncio lock before
        ``BEGIN IMMEDIATE``. SQLite admits one writer anyway, and its busy handler makes
        a waiting writer sleep (1, 2, 5, ... up to 100 ms per retry), which with eight
        concurrent jobs in one worker costs more than the work. Other processes still
        wait in the busy handler; the queue gives up after the same busy timeout."""
        if read_only or self.dialect_name != "sqlite":
            async with self._connect(read_only=read_only) as conn:
                yield conn
            return
        gate = self._sqlite_write_gate()
        try:
            # ``asyncio.timeout``, not ``wait_for``: Python 3.11's ``wait_for`` loses a
            # cancellation that arrives as the lock is granted, so a cancelled heartbeat
            # kept running and its job's ``execute_job`` never returned.
            async with asyncio.timeout(DEFAULT_BUSY_TIMEOUT_MS / 1000):
                await gate.acquire()
        except TimeoutError as exc:
            raise TransientStorageError(
                "database is locked: another write transaction of this process held it for "
                f"{DEFAULT_BUSY_TIMEOUT_MS / 1000:g}s (a transaction opened inside another?)"
            ) from exc
        try:
            async with self._connect(read_only=False) as conn:
                yield conn
        finally:
            gate.release()

    def _sqlite_write_gate(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._write_gate is None or self._write_gate[0] is not loop:
            self._write_gate = (loop, asyncio.Lock())
        return self._write_gate[1]

    @asynccontextmanager
    async def _connect(self, *, read_only: bool) -> AsyncIterator[AsyncConnection]:
        try:
            conn = await self.engine.connect()
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc, "connect") from exc
        try:
            try:
                if read_only and self.dialect_name == "sqlite":
                    await conn.execution_options(**{READ_ONLY_OPTION: True})
                await conn.begin()
            except sa_exc.SQLAlchemyError as exc:
                raise translate(exc, "begin transaction") from exc
            try:
                yield conn
            except BaseException:
                with suppress(Exception):
                    await conn.rollback()
                raise
            try:
                await conn.commit()
            except sa_exc.SQLAlchemyError as exc:
                raise translate(exc, "commit") from exc
        finally:
            with suppress(Exception):
                await conn.close()

    async def next_suspended_poll_at(self) -> datetime | None:
        """Earliest ``next_poll_at`` among suspended stages, for hosts that sleep until
        work is due (async here; the in-memory adapter's is a plain method)."""
        query = sa.select(sa.func.min(t.stages.c.next_poll_at)).where(
            t.stages.c.status == StageStatus.SUSPENDED.value
        )
        async with self.transaction(read_only=True) as tx:
            value: datetime | None = (await tx.execute(query, "next poll")).scalar_one_or_none()
        return value

    async def aclose(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()
