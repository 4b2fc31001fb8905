"""SQL JobTransport: the job queue as a table in the same database as the runs.

Because jobs live next to runs and stages, enqueueing a job commits atomically
with the state change that causes it (the caller's ``SqlTransaction`` supplies
the connection). ``dequeue`` leases jobs in one short transaction of its own:

* PostgreSQL: ``UPDATE jobs ... WHERE seq IN (SELECT seq ... ORDER BY priority
  DESC, next_poll_at, seq LIMIT n FOR UPDATE SKIP LOCKED) RETURNING *``, so
  concurrent workers never block on, or lease, the same job;
* SQLite: the same statement under ``BEGIN IMMEDIATE`` (one writer at a time).

After an enqueue of QUEUED jobs on PostgreSQL the transaction also sends ``NOTIFY
treadle_jobs`` (once per transaction, see ``SqlTransaction.notify``); PostgreSQL
delivers it only on commit, so a listening worker wakes exactly when the job
becomes visible. A job enqueued already LEASED (the committing worker chains into
the run's next stage) sends none: nobody else could take it. A job that becomes
available later (``requeue`` after a failure, an enqueue with a future
``next_poll_at``) is noted as a due time instead (``SqlTransaction.note_due``), so
workers wake when it becomes available, not at their next poll.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.sql.dialect import SetWrite, SqlDialect
from treadle.adapters.sql.engine import NOTIFY_CHANNEL
from treadle.adapters.sql.errors import translate
from treadle.adapters.sql.job_rows import (
    _JOB_FIELDS,
    _PG_JOB_ROWS,
    _available_later,
    job_rows,
)
from treadle.adapters.sql.persistence import SqlPersistence, SqlTransaction
from treadle.kernel.errors import (
    ConcurrencyError,
    DuplicateError,
    JobNotFoundError,
    TreadleError,
)
from treadle.kernel.model import Job, JobStatus, Run, StageRun
from treadle.ports.persistence import Transaction

__all__ = ["NOTIFY_CHANNEL", "SqlJobTransport"]

_LIVE = (JobStatus.QUEUED.value, JobStatus.LEASED.value, JobStatus.SUSPENDED.value)


_GET_JOB = sa.select(t.jobs).where(t.jobs.c.id == sa.bindparam("job_id"))
_UPDATE_JOB = sa.update(t.jobs).where(t.jobs.c.id == sa.bindparam("w_id"))


_GET_JOBS = sa.select(t.jobs).where(t.jobs.c.id.in_(sa.bindparam("job_ids", expanding=True)))


def _complete_jobs() -> Any:
    """Complete the jobs ``job_ids`` (``n`` distinct ids) only if all ``n`` exist: the
    guard makes a missing id complete none of them, in the same single statement."""
    others = t.jobs.alias("present")
    present = (
        sa.select(sa.func.count())
        .select_from(others)
        .where(others.c.id.in_(sa.bindparam("job_ids", expanding=True)))
        .scalar_subquery()
    )
    return (
        sa.update(t.jobs)
        .where(
            t.jobs.c.id.in_(sa.bindparam("job_ids", expanding=True)),
            present == sa.bindparam("n", type_=sa.Integer()),
        )
        .values(status=JobStatus.COMPLETED.value, worker_id=None)
    )


_COMPLETE_JOBS = _complete_jobs()
_COMPLETE_LEASED = (
    sa.update(t.jobs)
    .where(
        t.jobs.c.id == sa.bindparam("w_id"),
        t.jobs.c.status == JobStatus.LEASED.value,
        t.jobs.c.worker_id == sa.bindparam("w_worker_id"),
        t.jobs.c.attempts == sa.bindparam("w_attempts"),
    )
    .values(status=JobStatus.COMPLETED.value, worker_id=None)
)

_PG_ENQUEUE = pg_bulk.insert_select(
    t.jobs,
    _PG_JOB_ROWS,
    {name: _PG_JOB_ROWS.value(name) for name in _JOB_FIELDS},
    order_by="i",  # seq, the dequeue tie-break, follows the order of the jobs given
    suffix="ON CONFLICT DO NOTHING RETURNING id",
)


def _tx(tx: Transaction) -> SqlTransaction:
    if not isinstance(tx, SqlTransaction):
        raise TreadleError(
            f"SqlJobTransport needs a transaction from SqlPersistence, got {type(tx).__name__}"
        )
    return tx


def _owner_read(tx: SqlTransaction) -> Any:
    """``get_owned``'s statement: the run (locked, as ``get_run(for_update=True)``), one
    of its stages and a job, each table's columns labelled with its prefix."""
    columns = [
        *(c.label(f"r_{c.name}") for c in t.runs.c),
        *(c.label(f"s_{c.name}") for c in t.stages.c),
        *(c.label(f"j_{c.name}") for c in t.jobs.c),
    ]
    query = (
        sa.select(*columns)
        .select_from(
            t.runs.outerjoin(
                t.stages,
                sa.and_(
                    t.stages.c.run_id == t.runs.c.id,
                    t.stages.c.stage_id == sa.bindparam("stage_id"),
                ),
            ).outerjoin(t.jobs, t.jobs.c.id == sa.bindparam("job_id"))
        )
        .where(t.runs.c.id == sa.bindparam("run_id"))
    )
    return tx.dialect.lock(query, of=t.runs)


def _part(row: sa.Row[Any], prefix: str) -> dict[str, Any] | None:
    """The columns of one table of an ``_owner_read`` row, ``None`` if it joined none."""
    data = {key[2:]: value for key, value in row._mapping.items() if key.startswith(prefix)}
    key = "id" if prefix in ("r_", "j_") else "stage_id"
    return data if data[key] is not None else None


class _Columns:
    """Attribute access over a dict of a row's columns (for ``_job_from_row``)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)


def _job_from_row(row: Any) -> Job:
    return Job(
        id=row.id,
        workflow_run_id=row.run_id,
        workflow_id=row.workflow_id,
        stage_id=row.stage_id,
        status=JobStatus(row.status),
        priority=row.priority,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        next_poll_at=row.next_poll_at,
        enqueued_at=row.enqueued_at,
        worker_id=row.worker_id,
        heartbeat_at=row.heartbeat_at,
        last_error=row.last_error,
        sequence=int(row.seq),
        queue=row.queue,
    )


def _dequeue_statement(dialect: SqlDialect, by_queue: bool, by_stage: bool = False) -> Any:
    """The lease statement (parameters: now, lim, worker_id, with ``by_queue`` the list
    ``queues``, with ``by_stage`` the list ``stage_ids``): PostgreSQL's candidates skip
    rows other workers hold; SQLite's single writer needs no row lock."""
    c = t.jobs.c
    now = sa.bindparam("now", type_=t.jobs.c.next_poll_at.type)
    candidates = (
        sa.select(c.seq)
        .where(c.status == JobStatus.QUEUED.value, c.next_poll_at <= now)
        .order_by(c.priority.desc(), c.next_poll_at, c.seq)
        .limit(sa.bindparam("lim", type_=sa.Integer()))
    )
    if by_queue:
        candidates = candidates.where(c.queue.in_(sa.bindparam("queues", expanding=True)))
    if by_stage:
        candidates = candidates.where(c.stage_id.in_(sa.bindparam("stage_ids", expanding=True)))
    candidates = dialect.lock(candidates, skip_locked=True)
    return (
        sa.update(t.jobs)
        .where(c.seq.in_(candidates.scalar_subquery()))
        .values(
            status=JobStatus.LEASED.value,
            attempts=c.attempts + 1,
            worker_id=sa.bindparam("worker_id"),
            heartbeat_at=now,
        )
        .returning(*t.jobs.columns)
    )


def _enqueue_statement(tx: SqlTransaction) -> Any:
    return tx.dialect.insert(t.jobs).on_conflict_do_nothing().returning(t.jobs.c.id)


_ENQUEUE = SetWrite(
    "enqueue_jobs", _PG_ENQUEUE, _PG_JOB_ROWS, numbered=True, sqlite_build=_enqueue_statement
)


class SqlJobTransport:
    """The JobTransport port on the tables of the ``SqlPersistence`` it shares."""

    def __init__(self, persistence: SqlPersistence) -> None:
        self.persistence = persistence

    # -- transactional operations -------------------------------------------------
    async def enqueue(self, tx: Transaction, jobs: Sequence[Job]) -> None:
        sql = _tx(tx)
        if not jobs:
            sql._check()
            return
        ids = [job.id for job in jobs]
        seen: set[str] = set()
        for job_id in ids:
            if job_id in seen:
                raise DuplicateError(f"job {job_id!r} already exists")
            seen.add(job_id)
        rows = job_rows(jobs)
        # ON CONFLICT DO NOTHING + a count, so a duplicate does not abort a PostgreSQL
        # transaction the caller may want to continue. A list of parameter sets keeps the
        # statement cacheable; SQLAlchemy batches it into one INSERT ... RETURNING.
        # On PostgreSQL one INSERT ... SELECT of one JSON parameter instead (pg_bulk.py).
        inserted = (await sql.dialect.write_many(sql, _ENQUEUE, rows, "enqueue jobs")).all()
        if len(inserted) != len(rows):
            # The statement inserted some rows; the caller's rollback removes them.
            taken = await sql.execute(sa.select(t.jobs.c.id).where(t.jobs.c.id.in_(ids)))
            existing = {row.id for row in taken}
            dup = next((i for i in ids if i in existing), ids[0])
            raise DuplicateError(f"job {dup!r} already exists")
        if any(row["status"] == JobStatus.QUEUED.value for row in rows):
            await sql.notify("jobs")  # none for a job its enqueuing worker took itself
            for row in rows:
                if row["status"] == JobStatus.QUEUED.value:
                    sql.note_queued(str(row["queue"]))
        for job in jobs:
            if _available_later(job):
                sql.note_due("job", job.next_poll_at)  # a delayed activation

    async def get(self, tx: Transaction, job_id: str) -> Job | None:
        row = (await _tx(tx).execute(_GET_JOB, "get job", {"job_id": job_id})).first()
        return _job_from_row(row) if row is not None else None

    async def _set(self, tx: Transaction, job_id: str, values: dict[str, Any]) -> None:
        # Prebuilt statement: the SET clause follows the keys of the parameters.
        result = await _tx(tx).execute(_UPDATE_JOB, "update job", {**values, "w_id": job_id})
        if result.rowcount == 0:
            raise JobNotFoundError(f"no job with id {job_id!r}")

    async def complete(self, tx: Transaction, job_id: str) -> None:
        await self._set(tx, job_id, {"status": JobStatus.COMPLETED.value, "worker_id": None})

    async def get_owned(
        self, tx: Transaction, job_id: str, run_id: str, stage_id: str
    ) -> tuple[Run | None, StageRun | None, Job | None]:
        """The run (locked as ``get_run(for_update=True)`` locks it), its stage
        ``stage_id`` and the job ``job_id``, in one round trip: what a code workflow's
        activation reads at every commit to check it still owns the run (the kernel uses
        it where the job transport offers it, else three reads)."""
        sql = _tx(tx)
        query = sql.prepared("get_owned", _owner_read)
        params = {"run_id": run_id, "stage_id": stage_id, "job_id": job_id}
        row = (await sql.execute(query, "get owned", params)).first()
        if row is None:
            return None, None, await self.get(tx, job_id)
        run_data, stage_data, job_data = _part(row, "r_"), _part(row, "s_"), _part(row, "j_")
        assert run_data is not None
        run = await sql.run_from_columns(run_data)
        stage = await sql.stage_from_columns(stage_data) if stage_data is not None else None
        job = _job_from_row(_Columns(job_data)) if job_data is not None else None
        return run, stage, job

    async def get_many(self, tx: Transaction, job_ids: Sequence[str]) -> dict[str, Job]:
        sql = _tx(tx)
        sql._check()
        if not job_ids:
            return {}
        params = {"job_ids": list(dict.fromkeys(job_ids))}
        query = sql.prepared(
            "get_jobs",
            lambda tx: sa.select(t.jobs).where(tx.dialect.any_of(t.jobs.c.id, "job_ids")),
        )
        rows = await sql.execute(query, "get jobs", params)
        return {row.id: _job_from_row(row) for row in rows}

    async def complete_many(
        self,
        tx: Transaction,
        job_ids: Sequence[str],
        *,
        leases: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        sql = _tx(tx)
        sql._check()
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return
        if leases is not None:
            await self._complete_leased(sql, ids, leases)
            return
        params = {"job_ids": ids, "n": len(ids)}
        # Left as expanding IN lists on PostgreSQL too: one ``id = ANY(:ids)`` statement for
        # every size gets one cached plan, and a plan made while the table was small (a
        # scan) stayed in use as it grew (measured: 12 ms instead of 1 for 32 ids).
        result = await sql.execute(_COMPLETE_JOBS, "complete jobs", params)
        if result.rowcount == len(ids):
            return
        found = await sql.execute(_GET_JOBS, "complete jobs", {"job_ids": ids})
        present = {row.id for row in found}
        missing = [job_id for job_id in ids if job_id not in present]
        raise JobNotFoundError(f"no job with id(s) {', '.join(map(repr, missing))}")

    async def _complete_leased(
        self, sql: SqlTransaction, ids: list[str], leases: Mapping[str, tuple[str, int]]
    ) -> None:
        """``complete_many`` with ``leases``: one guarded update per job (a commit that
        did not read its jobs completes one or two), all or none."""
        rows = []
        for job_id in ids:
            lease = leases.get(job_id)
            if lease is None:
                raise ConcurrencyError(f"job {job_id!r} has no expected lease")
            rows.append({"w_id": job_id, "w_worker_id": lease[0], "w_attempts": lease[1]})
        result = await sql.execute(_COMPLETE_LEASED, "complete jobs", rows)
        if result.rowcount == len(rows):
            return
        found = {
            row.id: row for row in await sql.execute(_GET_JOBS, "complete jobs", {"job_ids": ids})
        }
        missing = [job_id for job_id in ids if job_id not in found]
        if missing:
            raise JobNotFoundError(f"no job with id(s) {', '.join(map(repr, missing))}")
        raise ConcurrencyError(
            f"job(s) {', '.join(map(repr, ids))} are no longer all leased as expected"
        )

    async def suspend(self, tx: Transaction, job_id: str, next_poll_at: datetime) -> None:
        await self._set(
            tx,
            job_id,
            {
                "status": JobStatus.SUSPENDED.value,
                "next_poll_at": next_poll_at,
                "worker_id": None,
            },
        )

    async def requeue(
        self,
        tx: Transaction,
        job_id: str,
        available_at: datetime,
        *,
        error: str | None = None,
        refund_attempt: bool = False,
    ) -> None:
        values: dict[str, Any] = {
            "status": JobStatus.QUEUED.value,
            "next_poll_at": available_at,
            "worker_id": None,
            "heartbeat_at": None,
        }
        if error is not None:
            values["last_error"] = error
        await self._set(tx, job_id, values)
        # A retry's backoff, or a job handed back (available now): either way the workers
        # that dequeue it are told, here and in other processes.
        _tx(tx).note_due("job", available_at)
        if refund_attempt:  # a rare path (a host giving jobs back): its own statement
            attempts = t.jobs.c.attempts
            refund = (
                sa.update(t.jobs)
                .where(t.jobs.c.id == job_id)
                .values(attempts=sa.case((attempts > 0, attempts - 1), else_=0))
            )
            await _tx(tx).execute(refund, "refund attempt")

    async def fail(self, tx: Transaction, job_id: str, error: str) -> None:
        await self._set(
            tx,
            job_id,
            {"status": JobStatus.FAILED.value, "last_error": error, "worker_id": None},
        )

    async def cancel_by_run(self, tx: Transaction, run_id: str) -> int:
        stmt = (
            sa.update(t.jobs)
            .where(t.jobs.c.run_id == run_id, t.jobs.c.status.in_(_LIVE))
            .values(status=JobStatus.CANCELLED.value, worker_id=None)
        )
        result = await _tx(tx).execute(stmt, "cancel jobs")
        return int(result.rowcount)

    async def live_jobs(self, tx: Transaction, run_id: str) -> list[Job]:
        query = (
            sa.select(t.jobs)
            .where(t.jobs.c.run_id == run_id, t.jobs.c.status.in_(_LIVE))
            .order_by(t.jobs.c.id)
        )
        jobs = [_job_from_row(row) for row in await _tx(tx).execute(query, "live jobs")]
        jobs.sort(key=lambda job: job.id)  # code-point order, whatever the collation
        return jobs

    async def stale_leases(
        self, tx: Transaction, older_than: datetime, *, limit: int = 100
    ) -> list[Job]:
        c = t.jobs.c
        query = (
            sa.select(t.jobs)
            .where(
                c.status == JobStatus.LEASED.value,
                c.heartbeat_at.is_not(None),
                c.heartbeat_at < older_than,
            )
            .order_by(c.heartbeat_at, c.seq)
            .limit(limit)
        )
        return [_job_from_row(row) for row in await _tx(tx).execute(query, "stale leases")]

    # -- own-transaction operations -------------------------------------------------
    async def dequeue(
        self,
        worker_id: str,
        now: datetime,
        *,
        limit: int = 1,
        queues: Sequence[str] | None = None,
        stage_ids: Sequence[str] | None = None,
    ) -> list[Job]:
        if limit <= 0:
            return []
        dialect = self.persistence.dialect
        by_queue = queues is not None
        by_stage = stage_ids is not None
        stmt = dialect.cached(
            f"dequeue_by_queue={by_queue},stage={by_stage}",
            lambda: _dequeue_statement(dialect, by_queue, by_stage),
        )
        params: dict[str, Any] = {"now": now, "lim": limit, "worker_id": worker_id}
        if queues is not None:
            params["queues"] = list(queues)
        if stage_ids is not None:
            params["stage_ids"] = list(stage_ids)
        async with self.persistence.connect() as conn:
            try:
                rows = (await conn.execute(stmt, params)).all()
            except sa_exc.SQLAlchemyError as exc:
                raise translate(exc, "dequeue") from exc
        jobs = [_job_from_row(row) for row in rows]
        jobs.sort(key=lambda job: (-job.priority, job.next_poll_at, job.sequence))
        return jobs

    async def extend_lease(self, job_id: str, worker_id: str, now: datetime) -> bool:
        c = t.jobs.c
        stmt = (
            sa.update(t.jobs)
            .where(
                c.id == job_id,
                c.status == JobStatus.LEASED.value,
                c.worker_id == worker_id,
            )
            .values(heartbeat_at=now)
        )
        async with self.persistence.connect() as conn:
            try:
                result = await conn.execute(stmt)
            except sa_exc.SQLAlchemyError as exc:
                raise translate(exc, "extend lease") from exc
        return bool(result.rowcount)

    async def next_due_at(self) -> datetime | None:
        query = sa.select(sa.func.min(t.jobs.c.next_poll_at)).where(
            t.jobs.c.status == JobStatus.QUEUED.value
        )
        async with self.persistence.connect(read_only=True) as conn:
            try:
                value: datetime | None = (await conn.execute(query)).scalar_one_or_none()
            except sa_exc.SQLAlchemyError as exc:
                raise translate(exc, "next due job") from exc
        return value
