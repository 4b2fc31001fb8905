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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import treadle.adapters.sql.schema as t
from treadle.adapters.due_times import (
    DueCallback,
    DueKind,
    DueWatchers,
    due_payload,
    earliest,
)
from treadle.adapters.event_feed import EventCallback, EventWatchers
from treadle.adapters.queued_jobs import QueuedCallback, QueuedJobWatchers
from treadle.adapters.run_ends import RunEndCallback, RunEndWatchers
from treadle.adapters.sql import wake_interest
from treadle.adapters.sql.ai_calls import SqlAICallLogger
from treadle.adapters.sql.dialect import Build, SqlDialect, dialect_for
from treadle.adapters.sql.engine import (
    DEFAULT_BUSY_TIMEOUT_MS,
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
from treadle.adapters.sql.schedules import SqlScheduleStore
from treadle.kernel.errors import (
    PayloadMissingError,
    StorageError,
    TransientStorageError,
    TreadleError,
)
from treadle.kernel.model import (
    MissingPayload,
    Run,
    StageRun,
    StageStatus,
)

if TYPE_CHECKING:
    from treadle.kernel.events import EventBase
    from treadle.kernel.model import Job
    from treadle.ports import BlobStore, JobTransport
from treadle.adapters.sql.persistence.annotations import SqlAnnotations
from treadle.adapters.sql.persistence.claim_read import claim_candidates
from treadle.adapters.sql.persistence.idempotency import SqlIdempotency
from treadle.adapters.sql.persistence.inbox import SqlInbox
from treadle.adapters.sql.persistence.insert_set import insert_set
from treadle.adapters.sql.persistence.journal import SqlJournal
from treadle.adapters.sql.persistence.logs import SqlLogs
from treadle.adapters.sql.persistence.outbox import SqlOutbox
from treadle.adapters.sql.persistence.runs import SqlRuns
from treadle.adapters.sql.persistence.shared import (
    _RUN_PAYLOADS,
    _STAGE_PAYLOADS,
    _stage_from_columns,
)
from treadle.adapters.sql.persistence.stages import SqlStages
from treadle.adapters.sql.persistence.timers import SqlTimers
from treadle.adapters.sql.persistence.write_set import write_set


class SqlTransaction:
    """A unit of work on one connection; see the module docstring for the rules."""

    def __init__(
        self,
        connection: AsyncConnection,
        dialect: SqlDialect,
        payloads: PayloadOffload | None = None,
    ) -> None:
        self.connection = connection
        self.dialect = dialect
        """Where PostgreSQL and SQLite differ (``adapters/sql/dialect.py``)."""
        self.dialect_name = dialect.name
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
        self.appended_events = False
        """Whether it appended events: the persistence's event watchers are told once it
        commits (``adapters/event_feed.py``)."""
        self.notify_events = True
        """PostgreSQL: send ``NOTIFY treadle_events`` with appended events (the
        persistence's ``notify_events``)."""
        self.final_runs: dict[str, Run] | None = None
        """The terminal runs this transaction wrote, as written: told along with
        ``ended_runs``, so a waiter in this process needs no read for the outcome."""
        self.due: dict[DueKind, datetime] | None = None
        """The earliest due time per kind this transaction wrote (``note_due``): sent as
        one NOTIFY before it commits, told to the due watchers after."""
        self.queued: set[str] | None = None
        """Queues this transaction queued jobs on (``note_queued``): told to the
        persistence's queued-job watchers once it commits."""
        # One store per concern (the ``Transaction`` port's attributes), all on this
        # transaction's connection.
        self.runs = SqlRuns(self)
        self.stages = SqlStages(self)
        self.outbox = SqlOutbox(self)
        self.idempotency = SqlIdempotency(self)
        self.annotations = SqlAnnotations(self)
        self.logs = SqlLogs(self)
        self.journal = SqlJournal(self)
        self.inbox = SqlInbox(self)
        self.timers = SqlTimers(self)

    @property
    def flow(self) -> SqlFlowControl:
        """The FlowControl concern (``ports.flow_control``) on this transaction."""
        return SqlFlowControl(self)

    @property
    def schedules(self) -> SqlScheduleStore:
        """Cron schedules in this unit of work (``adapters/sql/schedules.py``)."""
        return SqlScheduleStore(self)

    @property
    def ai_calls(self) -> SqlAICallLogger:
        """Recorded AI calls and run totals in this unit of work
        (``adapters/sql/ai_calls.py``)."""
        return SqlAICallLogger(self)

    @property
    def retention(self) -> SqlRetention:
        """Purging expired runs in this transaction (``adapters/sql/retention.py``)."""
        return SqlRetention(self)

    def end(self, ended: SqlTransaction) -> None:
        """Mark the transaction ended and point its stores at ``ended`` (an inactive
        transaction): a store kept past the end still refuses use, and the transaction
        and its stores, which refer to each other, are freed by reference counting
        instead of by the cyclic garbage collector."""
        self.active = False
        self.runs._tx = ended
        self.stages._tx = ended
        self.outbox._tx = ended
        self.idempotency._tx = ended
        self.annotations._tx = ended
        self.logs._tx = ended
        self.journal._tx = ended
        self.inbox._tx = ended
        self.timers._tx = ended

    async def write_set(
        self,
        transport: JobTransport,
        *,
        runs: Sequence[Run],
        new_jobs: Sequence[Job],
        completed_jobs: Sequence[str],
        leases: Mapping[str, tuple[str, int]] | None,
        stages: Sequence[StageRun],
        events: Sequence[EventBase],
        last: bool = False,
        prior: Mapping[str, Run] | None = None,
        prior_stages: Mapping[tuple[str, str], StageRun] | None = None,
    ) -> bool:
        """The ``WriteSetStore`` capability (``ports/persistence/write_set.py``): on
        PostgreSQL one statement (``adapters/sql/persistence/write_set.py``), else ``False``."""
        if not self.dialect.set_statements:
            return False
        return await write_set(
            self,
            transport,
            runs=runs,
            new_jobs=new_jobs,
            completed_jobs=completed_jobs,
            leases=leases,
            stages=stages,
            events=events,
            last=last,
            prior=prior,
            prior_stages=prior_stages,
        )

    async def insert_set(
        self,
        transport: JobTransport,
        *,
        runs: Sequence[Run],
        new_jobs: Sequence[Job],
        stages: Sequence[StageRun],
        events: Sequence[EventBase],
        last: bool = False,
    ) -> bool:
        """The ``InsertSetStore`` capability (``ports/persistence/write_set.py``): on
        PostgreSQL one statement (``adapters/sql/persistence/insert_set.py``), else
        ``False``."""
        if not self.dialect.set_statements:
            return False
        return await insert_set(
            self, transport, runs=runs, new_jobs=new_jobs, stages=stages, events=events, last=last
        )

    async def claim_candidates(
        self, limit: int
    ) -> tuple[list[Run], dict[str, list[StageRun]], set[str]] | None:
        """The ``ClaimReadStore`` capability (``ports/persistence/claim_read.py``): on
        PostgreSQL one statement (``adapters/sql/persistence/claim_read.py``), else
        ``None``."""
        return await claim_candidates(self, limit)

    # -- plumbing ----------------------------------------------------------------
    @property
    def is_postgres(self) -> bool:
        return self.dialect.is_postgres

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
            if self.dialect.inline:  # nothing to await (SQLite's inline driver)
                return self.connection.sync_connection.execute(statement, parameters)  # type: ignore[union-attr]
            return await self.connection.execute(statement, parameters)
        except sa_exc.SQLAlchemyError as exc:
            raise translate(exc, what) from exc

    async def notify(self, payload: str) -> None:
        """``NOTIFY treadle_jobs, payload`` on PostgreSQL (delivered on commit), at most
        once per payload and transaction: PostgreSQL would fold duplicates anyway, but
        each statement is a round trip. A no-op on SQLite, whose workers poll."""
        statement = self.dialect.notify_statement(payload)
        if statement is None or payload in self._notified:
            return
        self._notified.add(payload)
        await self.execute(statement, "notify")

    def note_queued(self, queue: str) -> None:
        """This transaction queued a job on ``queue`` (``adapters/queued_jobs.py``)."""
        if self.queued is None:
            self.queued = set()
        self.queued.add(queue)

    def note_due(self, kind: DueKind, when: datetime) -> None:
        """This transaction writes timed work of ``kind`` due at ``when`` (see
        ``adapters/due_times.py``). Only the earliest per kind is kept, so a transaction
        sends at most one NOTIFY however much timed work it writes."""
        if self.due is None:
            self.due = {}
        earliest(self.due, kind, when)

    def prepared(self, name: str, build: Build) -> Any:
        """The statement ``build(self)`` makes, built once per persistence (its dialect
        object keeps it; see ``SqlDialect.prepared``) and reused."""
        return self.dialect.prepared(self, name, build)

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

    async def run_from_columns(self, data: dict[str, Any]) -> Run:
        """The run of a ``runs`` row given as a dict of its columns (a joined read)."""
        refs = await self._load_payloads(data, _RUN_PAYLOADS, data["id"])
        run = Run.model_validate(data)
        self._remember(run, refs, _RUN_PAYLOADS)
        return run

    async def stage_from_columns(self, data: dict[str, Any]) -> StageRun:
        """The stage of a ``stages`` row given as a dict of its columns (a joined read)."""
        refs = await self._load_payloads(data, _STAGE_PAYLOADS, data["run_id"])
        stage = _stage_from_columns(data)
        self._remember(stage, refs, _STAGE_PAYLOADS)
        return stage


class SqlPersistence:
    """The Persistence port on a SQL database (PostgreSQL or SQLite).

    Build it from an ``AsyncEngine`` you own, or with ``await SqlPersistence.open(url)``,
    which creates (and on ``close()`` disposes) the engine, and can migrate first.
    """

    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = False) -> None:
        self.engine = engine
        self.dialect = dialect_for(engine.dialect.name)  # ValueError if unsupported
        self.dialect_name = self.dialect.name
        self._owns_engine = owns_engine
        self.payloads: PayloadOffload | None = None
        self._write_gate: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self.run_ends = RunEndWatchers()
        self.due_watchers = DueWatchers()
        self.queued_watchers = QueuedJobWatchers()
        self.event_watchers = EventWatchers()
        self.notify_events = True
        """PostgreSQL: while a live reader is announced (``announce_event_reader``, the
        SSE hub of ``treadle serve``), every commit that appends events sends ``NOTIFY
        treadle_events``, which that reader waits on. Each such commit also wakes every
        LISTENing backend of the database (PostgreSQL signals listeners whatever their
        channel), which costs the workers' listeners a transaction; set ``False`` in
        processes whose events no live reader needs to see at once, even while one is
        announced (readers then find them by their fallback read)."""
        self._ended: SqlTransaction | None = None
        self.claim_reads = self.dialect.set_statements
        """PostgreSQL: transactions offer ``claim_candidates`` (``ports/persistence/
        claim_read.py``), a claim's reads in one statement without ``BEGIN``."""
        self.dialect.configure(engine)

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
        return self.dialect.is_postgres

    def _ended_transaction(self) -> SqlTransaction:
        """The inactive transaction the stores of ended ones point to (built once)."""
        if self._ended is None:
            self._ended = SqlTransaction(cast(AsyncConnection, None), self.dialect)
            self._ended.active = False
        return self._ended

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
                tx = SqlTransaction(conn, self.dialect, self.payloads)
                if not self.notify_events:
                    tx.notify_events = False
                try:
                    yield tx
                    notify = self.dialect.payload_notify
                    if tx.due is not None and notify is not None:
                        # Other processes' workers hear of it on commit (``due_times.py``).
                        payload = {"payload": due_payload(tx.due)}
                        await tx.execute(notify, "notify due times", payload)
                finally:
                    tx.end(self._ended_transaction())
        except BaseException:
            if tx is not None and tx.created_blobs and self.payloads is not None:
                await self.payloads.discard(tx.created_blobs)  # rolled back: nothing refers
            raise
        if tx.ended_runs is not None:
            self.run_ends.tell(tx.ended_runs, tx.final_runs)
        if tx.appended_events and self.event_watchers:
            self.event_watchers.tell()
        if tx.due is not None:
            self.due_watchers.tell(tx.due)
        if tx.queued is not None and self.queued_watchers:
            self.queued_watchers.tell(frozenset(tx.queued))

    def watch_due(self, callback: DueCallback) -> Callable[[], None]:
        """Call ``callback(due)`` after each commit of this process that wrote timed work
        (see ``DueWatchers``); returns the function that stops it."""
        return self.due_watchers.watch(callback)

    def watch_queued(self, callback: QueuedCallback) -> Callable[[], None]:
        """Call ``callback(queues)`` after each commit of this process that queued jobs
        (``QueuedJobWatchers``); returns the function that stops it."""
        return self.queued_watchers.watch(callback)

    def watch_events(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback()`` after each commit of this process that appended events
        (see ``adapters.event_feed``); returns the function that stops it."""
        return self.event_watchers.watch(callback)

    def watch_run_ends(self, callback: RunEndCallback) -> Callable[[], None]:
        """Call ``callback(run_ids, outcomes)`` after each commit that finished runs in
        this process (see ``RunEndWatchers``); returns the function that stops it."""
        return self.run_ends.watch(callback)

    # -- wake-up interest (``adapters/sql/wake_interest.py``): PostgreSQL sends a run's
    # ``end:`` NOTIFY and the event feed's only to those who asked; no-ops on SQLite.
    async def mark_run_end(
        self, run_id: str, ttl: float = wake_interest.RUN_END_MARK_TTL
    ) -> str | None:
        """Ask for ``run_id``'s ``end:<id>`` NOTIFY, for a waiter in this process that
        must hear of an end committed by another one. Call it before reading the run:
        it commits the mark under a share lock of the run's row, so an end committed
        after the read notifies. Returns the run's status under that lock (``None``:
        no such run, or not PostgreSQL)."""
        if not self.dialect.is_postgres:
            return None
        async with self.connect() as conn:
            return await wake_interest.mark_run_end(conn, run_id, ttl)

    async def mark_any_run_end(self, ttl: float) -> None:
        """Ask for every run's ``end:<id>`` NOTIFY for ``ttl`` seconds (a worker waiting
        for a concurrency slot another process's run may free)."""
        if self.dialect.is_postgres:
            async with self.connect() as conn:
                await wake_interest.mark_any_run_end(conn, ttl)

    async def announce_event_reader(self, reader_id: str, ttl: float) -> None:
        """A live event-feed reader: commits that append events send ``NOTIFY
        treadle_events`` for the next ``ttl`` seconds (renew before they pass)."""
        if self.dialect.is_postgres:
            async with self.connect() as conn:
                await wake_interest.announce_reader(conn, reader_id, ttl)

    async def withdraw_event_reader(self, reader_id: str) -> None:
        """The reader ``announce_event_reader`` announced has no client any more."""
        if self.dialect.is_postgres:
            async with self.connect() as conn:
                await wake_interest.withdraw_reader(conn, reader_id)

    @asynccontextmanager
    async def connect(self, *, read_only: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection inside a begun transaction, with commit/rollback and error translation
        (the job transport's own short transactions use it too).

        SQLite hook: write transactions of this process queue on an asyncio lock before
        ``BEGIN IMMEDIATE``. SQLite admits one writer anyway, and its busy handler makes
        a waiting writer sleep (1, 2, 5, ... up to 100 ms per retry), which with eight
        concurrent jobs in one worker costs more than the work. Other processes still
        wait in the busy handler; the queue gives up after the same busy timeout."""
        if read_only or not self.dialect.single_writer:
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
                if read_only and self.dialect.read_only_options:
                    await conn.execution_options(**self.dialect.read_only_options)
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
