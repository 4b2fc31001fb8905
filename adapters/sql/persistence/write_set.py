"""``tx.write_set`` on PostgreSQL: a hot-path commit's writes in ONE statement.

A chained stage's result commit (``WriteBuffer.flush``) writes the run, the next
stage's job, the finished job, the stages and the events. Per kind that is one
statement each (five round trips inside BEGIN ... COMMIT); here they are the
data-modifying CTEs of one ``WITH ... SELECT``, built from the same pieces as the
per-kind statements (``pg_bulk.update_from_sql``/``insert_select_sql``,
``outbox.pg_append_events_ctes``), each with its own parameters (``r_rows``,
``j_rows``, ...)::

    WITH w_r AS (UPDATE runs ... WHERE version = expected RETURNING t.id),
         w_j AS (INSERT INTO jobs ... WHERE <gate> ... RETURNING id),
         w_d AS (UPDATE jobs ... WHERE still leased as expected AND <gate> RETURNING t.id),
         w_s AS (UPDATE stages ... WHERE version = expected AND <gate> RETURNING t.run_id),
         e_v, e_n, e_s AS (INSERT INTO run_event_seq ... WHERE <gate> ...), e_q,
         w_e AS (INSERT INTO outbox ... RETURNING run_id, sequence),
         w_l AS (INSERT INTO journal ... WHERE <gate> ...)  -- with journal entries only
    SELECT <rows written per CTE>, CASE WHEN <every count as expected> THEN 0
           ELSE CAST('treadle write_set guard: ...' AS INTEGER) END, pg_notify(...)

The guards. ``<gate>`` is ``(SELECT count(*) FROM w_r) = :r_n``: every later CTE
waits for the run update to finish (so the runs' row locks are taken first, in id
order, as every writer of a run takes them) and writes nothing unless every run still
had its version. Sibling CTEs share one snapshot and cannot see each other's rows, so
the other guards (a job's lease, a stage's version, a job id already taken) are checked
on the counts: any count short of what was sent makes the final column's CAST fail,
which aborts the whole statement (and the transaction it is in), so NOTHING is
written, and ``write_set`` raises what the per-kind call would have
(``ConcurrencyError``, ``DuplicateError``). The CAST's text depends on the counts, so
the planner cannot fold it into a constant error.

The NOTIFYs the per-kind calls send (the event feed's while a live reader is announced
and ``notify_events`` is on, new QUEUED jobs' ``jobs``) are columns of the final SELECT:
sent on commit, dropped with a rollback. A run end's ``end:<id>`` is the ``runs``
trigger's, for runs someone waits on (``adapters/sql/wake_interest.py``). The due-time
NOTIFY stays with the transaction's end (``SqlPersistence.transaction``), as for every
transaction.

Not taken here (``write_set`` returns ``False`` and the caller makes the per-kind
calls): SQLite (several statements anyway), a job transport other than this
persistence's, a set without a run to update, and events whose JSON goes to the blob
store (their number must be known before the reference is written).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

import treadle.adapters.sql.persistence.write_set_one as write_set_one
import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.sql.engine import NOTIFY_CHANNEL
from treadle.adapters.sql.errors import translate
from treadle.adapters.sql.job_rows import _JOB_FIELDS, _PG_JOB_ROWS, _available_later, job_rows
from treadle.adapters.sql.persistence.journal import (
    _PG_JOURNAL_ROWS,
    pg_insert_journal_sql,
    pg_journal_rows,
)
from treadle.adapters.sql.persistence.outbox import (
    _PG_OUTBOX_ROWS,
    FEED_NOTIFY,
    SqlOutbox,
    inline_event_rows,
    pg_append_events_ctes,
)
from treadle.adapters.sql.persistence.runs import _PG_RUN_ROWS, _RUN_SET, SqlRuns
from treadle.adapters.sql.persistence.shared import _STAGE_PAYLOADS, SqlUnit, _reject_duplicates
from treadle.adapters.sql.persistence.stages import (
    _PG_STAGE_ROWS,
    _STAGE_SET,
    SqlStages,
    _stage_values,
)
from treadle.kernel.errors import ConcurrencyError, DuplicateError
from treadle.kernel.events import EventBase
from treadle.kernel.model import Job, JobStatus, Run, StageRun, evolve

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncConnection

    from treadle.adapters.due_times import DueKind
    from treadle.kernel.workflows.model import JournalEntry
    from treadle.ports.job_transport import JobTransport


class SqlTransactionUnit(SqlUnit, Protocol):
    """What ``write_set`` uses of a ``SqlTransaction`` (a protocol: this module is
    below ``connection``, which calls it)."""

    connection: AsyncConnection
    created_blobs: list[str]
    due: dict[DueKind, datetime] | None
    active: bool
    _notified: set[str]
    _fresh: dict[str, set[str]]
    runs: SqlRuns
    stages: SqlStages
    outbox: SqlOutbox

    def note_queued(self, queue: str) -> None: ...


__all__ = ["GUARD_MARK", "SqlTransactionUnit", "write_set"]

GUARD_MARK = write_set_one.GUARD_MARK
"""The text of the error the statement raises when a guard fails."""

_GUARD_RE = re.compile(
    GUARD_MARK
    + r": r=(\d+)/(\d+) j=(\d+)/(\d+) d=(\d+)/(\d+) s=(\d+)/(\d+) e=\d+/\d+(?: l=(\d+)/(\d+))?"
)
"""The counts a failed guard reports; ``l`` (journal entries) only from the general
statement (``write_set_one``'s carries none)."""

_GATE = "(SELECT count(*) FROM w_r) = :r_n"

_COUNTED = ("r", "j", "d", "s", "e", "l")
"""The parts whose written rows are counted: runs, new jobs, done jobs, stages, events,
journal entries."""

_PG_DONE_ROWS = pg_bulk.RecordSet(
    t.jobs,
    {
        "w_id": "id",
        "w_status": "status",
        "w_worker_id": "worker_id",
        "w_attempts": "attempts",
        "status": "status",
        "worker_id": "worker_id",
    },
)
"""A completed job: its id, the lease it must still have (``w_*``), what it becomes."""


def _shape_sql(
    jobs: bool, done: bool, leased: bool, stages: bool, events: bool, feed: bool, journal: bool
) -> str:
    ctes = [
        "w_r AS ("
        + pg_bulk.update_from_sql(
            t.runs,
            _PG_RUN_ROWS,
            {"id": "w_id"},
            {"version": "w_version"},
            _RUN_SET,
            rows="r_rows",
            keys_param="r_keys",
            returning="t.id",
        )
        + ")"
    ]
    counts = {"r": "(SELECT count(*) FROM w_r)", "j": "0", "d": "0", "s": "0", "e": "0", "l": "0"}
    if jobs:
        ctes.append(
            "w_j AS ("
            + pg_bulk.insert_select_sql(
                t.jobs,
                _PG_JOB_ROWS,
                {name: _PG_JOB_ROWS.value(name) for name in _JOB_FIELDS},
                order_by="i",  # seq, the dequeue tie-break, in the order of the jobs given
                suffix="ON CONFLICT DO NOTHING RETURNING id",
                rows="j_rows",
                where=_GATE,
            )
            + ")"
        )
        counts["j"] = "(SELECT count(*) FROM w_j)"
    if done:
        guards = {"status": "w_status", "worker_id": "w_worker_id", "attempts": "w_attempts"}
        ctes.append(
            "w_d AS ("
            + pg_bulk.update_from_sql(
                t.jobs,
                _PG_DONE_ROWS,
                {"id": "w_id"},
                guards if leased else {},
                ("status", "worker_id"),
                rows="d_rows",
                keys_param="d_keys",
                where=_GATE,
                returning="t.id",
            )
            + ")"
        )
        counts["d"] = "(SELECT count(*) FROM w_d)"
    if stages:
        ctes.append(
            "w_s AS ("
            + pg_bulk.update_from_sql(
                t.stages,
                _PG_STAGE_ROWS,
                {"run_id": "w_run_id", "stage_id": "w_stage_id"},
                {"version": "w_version"},
                _STAGE_SET,
                rows="s_rows",
                keys_param="s_keys",
                where=_GATE,
                returning="t.run_id",
            )
            + ")"
        )
        counts["s"] = "(SELECT count(*) FROM w_s)"
    if events:
        event_ctes, insert = pg_append_events_ctes(rows="e_rows", prefix="e_", where=_GATE)
        ctes.extend(event_ctes)
        ctes.append(f"w_e AS ({insert})")
        counts["e"] = "(SELECT count(*) FROM w_e)"
    # -- a code workflow's new journal entries (its last step and the calls recorded
    # since, committed with the run's end: ``kernel/workflows/executor.py``) ---------
    if journal:
        ctes.append(f"w_l AS ({pg_insert_journal_sql('l_rows', _GATE)})")
        counts["l"] = "(SELECT count(*) FROM w_l)"
    # -- end of the journal part -----------------------------------------------------
    ok = " AND ".join(f"{counts[k]} = :{k}_n" for k in _COUNTED)
    report = " || ".join(f"' {k}=' || {counts[k]} || '/' || :{k}_n" for k in _COUNTED)
    columns = [f"{counts[k]} AS {k}" for k in _COUNTED]
    columns.append(
        f"CASE WHEN {ok} THEN 0 ELSE CAST('{GUARD_MARK}:' || {report} AS INTEGER) END AS ok"
    )
    if events and feed:
        columns.append(f"{FEED_NOTIFY} AS feed")
    columns.append("CASE WHEN :notify_jobs THEN pg_notify(:channel, 'jobs') END AS jobs")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(columns)}"


def _statement(
    tx: SqlTransactionUnit, shape: tuple[bool, bool, bool, bool, bool, bool, bool]
) -> sa.TextClause:
    name = "write_set:" + "".join("1" if part else "0" for part in shape)

    def build() -> sa.TextClause:
        return sa.text(_shape_sql(*shape)).bindparams(
            sa.bindparam("channel", value=NOTIFY_CHANNEL),
            sa.bindparam("notify_jobs", type_=sa.Boolean()),
            *(sa.bindparam(f"{k}_n", type_=sa.Integer()) for k in _COUNTED),
            *(
                sa.bindparam(f"{k}_rows", type_=sa.Text())
                for k, present in zip(
                    ("j", "d", "s", "e", "l"), shape[:2] + shape[3:5] + shape[6:], strict=True
                )
                if present
            ),
            sa.bindparam("r_rows", type_=sa.Text()),
        )

    statement: sa.TextClause = tx.dialect.cached(name, build)
    return statement


async def write_set(
    tx: SqlTransactionUnit,
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
    journal: Sequence[JournalEntry] = (),
) -> bool:
    """``WriteSetStore.write_set`` on a ``SqlTransaction`` (see the module docstring;
    one run's set: ``write_set_one.py``)."""
    tx._check()
    persistence = getattr(transport, "persistence", None)
    if (
        not tx.dialect.set_statements
        or not runs
        # The SQL job transport on this persistence (whose dialect object is its own):
        # another transport's jobs are not rows of this database.
        or getattr(persistence, "dialect", None) is not tx.dialect
    ):
        return False
    # Events first: one whose JSON goes to the blob store sends the whole set down the
    # per-kind path before anything is stored.
    found_rows = inline_event_rows(tx, events)
    if found_rows is None:
        return False
    event_rows = found_rows
    journal_rows: list[dict[str, Any]] = []
    if journal:  # new entries only; a value for the blob store takes the per-kind path
        offloads = tx.payloads.offloads if tx.payloads is not None else None
        found = pg_journal_rows(list(journal), offloads)
        if found is None or any(entry.id is not None for entry in journal):
            return False
        journal_rows = found
    _reject_duplicates([run.id for run in runs], "run")
    _reject_duplicates([(s.workflow_run_id, s.stage_id) for s in stages], "stage")
    if len(set(completed_jobs)) != len(completed_jobs) or len({j.id for j in new_jobs}) != len(
        new_jobs
    ):
        return False  # the per-kind calls say which
    # One run's set (a chained stage's commit) takes the statement of scalar
    # parameters, which the server plans in a fraction of the time (write_set_one.py).
    # (Not a set with journal entries: that part is the general statement's, ``w_l``.)
    one = (
        not journal_rows
        and len(runs) == 1
        and write_set_one.fits(
            runs[0].id,
            len(new_jobs),
            len(completed_jobs),
            len(stages),
            [row["run_id"] for row in event_rows],
        )
    )
    # Runs, in id order (the order their row locks are taken in, as ``update_many``).
    new_runs: list[Run] = []
    run_rows: list[dict[str, Any]] = []
    run_columns: tuple[str, ...] = ()
    for run in sorted(runs, key=lambda r: r.id):
        updated = evolve(run, {"version": run.version + 1, "stages": []})
        new_runs.append(updated)
        if one:
            stored = prior.get(run.id) if prior is not None else None
            if stored is not None and stored.version != run.version:
                stored = None  # not the version this write replaces: write every column
            run_columns, values = await write_set_one.run_columns(tx, updated, stored)
        else:
            values = await tx.runs._run_row(updated)
            del values["id"]
            values["w_id"], values["w_version"] = run.id, run.version
        run_rows.append(values)
    # New jobs, numbered in the order given.
    rows = job_rows(new_jobs)
    for i, row in enumerate(rows):
        row["i"] = i
    notify_jobs = any(row["status"] == JobStatus.QUEUED.value for row in rows)
    # Completed jobs, guarded by their leases when given.
    done: list[dict[str, Any]] = []
    for job_id in sorted(completed_jobs):
        worker_id, attempts = None, 0
        if leases is not None:
            lease = leases.get(job_id)
            if lease is None:
                raise ConcurrencyError(f"job {job_id!r} has no expected lease")
            worker_id, attempts = lease
        done.append(
            {
                "w_id": job_id,
                "w_status": JobStatus.LEASED.value,
                "w_worker_id": worker_id,
                "w_attempts": attempts,
                "status": JobStatus.COMPLETED.value,
                "worker_id": None,
            }
        )
    # Stages, in (run, stage) order.
    stage_rows: list[dict[str, Any]] = []
    new_stages: list[StageRun] = []
    stage_sets: list[tuple[str, ...]] = []
    for stage in sorted(stages, key=lambda s: (s.workflow_run_id, s.stage_id)):
        updated_stage = evolve(stage, {"version": stage.version + 1})
        if one:
            values, written = await _one_stage_row(tx, updated_stage, stage, prior_stages)
            stage_sets.append(written)
        else:
            values = await tx.stages._stage_row(updated_stage)
        del values["run_id"], values["stage_id"]
        values["w_run_id"], values["w_stage_id"] = stage.workflow_run_id, stage.stage_id
        values["w_version"] = stage.version
        stage_rows.append(values)
        new_stages.append(updated_stage)
    # The event feed's NOTIFY unless this transaction's persistence sends none
    # (``notify_events``), as ``outbox.append``.
    feed = tx.notify_events
    statement: sa.TextClause
    params: dict[str, Any]
    if one:
        one_shape: write_set_one.Shape = (
            run_columns,
            len(rows),
            len(done),
            leases is not None,
            tuple(stage_sets),
            len(event_rows),
            feed,
        )
        statement = write_set_one.statement(tx, one_shape)
        params = write_set_one.params(
            runs[0],
            run_rows[0],
            rows,
            done,
            list(zip(stage_rows, stage_sets, strict=True)),
            event_rows,
        )
    else:
        params = dict(_PG_RUN_ROWS.encode(run_rows, "r_rows"))
        params["r_keys"], params["r_n"] = [run.id for run in new_runs], len(run_rows)
        if rows:
            params |= _PG_JOB_ROWS.encode(rows, "j_rows")
        if done:
            params |= _PG_DONE_ROWS.encode(done, "d_rows")
            params["d_keys"] = [row["w_id"] for row in done]
        if stage_rows:
            params |= _PG_STAGE_ROWS.encode(stage_rows, "s_rows")
            params["s_keys"] = sorted({s.workflow_run_id for s in new_stages})
        if event_rows:
            params |= _PG_OUTBOX_ROWS.encode(event_rows, "e_rows")
        if journal_rows:
            params |= _PG_JOURNAL_ROWS.encode(journal_rows, "l_rows")
        shape = (
            bool(rows),
            bool(done),
            leases is not None,
            bool(stage_rows),
            bool(event_rows),
            feed,
            bool(journal_rows),
        )
        statement = _statement(tx, shape)
        params["j_n"], params["d_n"] = len(rows), len(done)
        params["s_n"], params["e_n"] = len(stage_rows), len(event_rows)
        params["l_n"] = len(journal_rows)
    if event_rows:
        tx.outbox._note_ended(event_rows)  # the NOTIFY is the runs trigger's (wake_interest)
    notify_jobs = notify_jobs and "jobs" not in tx._notified
    params["nj" if one else "notify_jobs"] = notify_jobs
    tx._check()
    # Noted before it runs: a due time makes the transaction's end send a NOTIFY, so a
    # set that writes one is not the whole transaction.
    for job in new_jobs:
        if _available_later(job):
            tx.note_due("job", job.next_poll_at)  # a delayed activation
    for stage in new_stages:
        tx.stages._note_suspended(stage)
    driver = await _alone(tx) if last and tx.due is None and not tx.created_blobs else None
    try:
        await tx.connection.execute(statement, params)
    except sa_exc.DBAPIError as exc:
        raise _guard_error(exc) from exc
    finally:
        if driver is not None:
            await _transactional_again(tx, driver)
    if driver is not None:
        tx.active = False  # committed: a further statement could not join it
    # What the per-kind calls note for after the commit.
    if event_rows:
        tx.appended_events = True
    if notify_jobs:
        tx._notified.add("jobs")
    for row in rows:
        if row["status"] == JobStatus.QUEUED.value:
            tx.note_queued(str(row["queue"]))  # this process's queued-job watchers
    for run in new_runs:
        if run.status.terminal:
            tx.runs._note_final(run)
    return True


async def _one_stage_row(
    tx: SqlTransactionUnit,
    updated: StageRun,
    stage: StageRun,
    prior_stages: Mapping[tuple[str, str], StageRun] | None,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A stage's row for ``write_set_one`` and the columns it writes: those that differ
    from the stage as stored (``prior_stages``, when of the version ``stage`` replaces),
    payloads offloaded only for those."""
    values = _stage_values(updated)
    key = (stage.workflow_run_id, stage.stage_id)
    stored = prior_stages.get(key) if prior_stages is not None else None
    if stored is not None and stored.version != stage.version:
        stored = None
    written = write_set_one.stage_columns(
        values, _stage_values(stored) if stored is not None else None
    )
    for name in _STAGE_PAYLOADS:
        if name in written:
            values[name] = await tx._put_payload(stage.workflow_run_id, values[name])
    values["run_id"] = stage.workflow_run_id
    return values, written


async def _alone(tx: SqlTransactionUnit) -> Any | None:
    """When nothing has been sent in ``tx`` yet (psycopg has not begun a transaction on
    the connection): the driver connection, switched to autocommit, so the one statement
    is sent without ``BEGIN`` and ``COMMIT`` (a single statement is atomic by itself);
    else ``None`` (it runs inside the transaction begun already)."""
    from psycopg.pq import TransactionStatus  # PostgreSQL only: the driver is psycopg

    raw = await tx.connection.get_raw_connection()
    driver = raw.driver_connection
    if driver is None or driver.info.transaction_status != TransactionStatus.IDLE:
        return None
    await driver.set_autocommit(True)
    return driver


async def _transactional_again(tx: SqlTransactionUnit, driver: Any) -> None:
    """Switch ``driver`` back out of autocommit before the connection goes back to the
    pool; a connection that cannot be switched back is discarded, never reused."""
    try:
        await driver.set_autocommit(False)
    except BaseException:
        with suppress(Exception):
            await tx.connection.invalidate()
        raise


def _guard_error(exc: sa_exc.DBAPIError) -> Exception:
    """The error of a failed statement: the per-kind call's for a failed guard."""
    found = _GUARD_RE.search(str(exc.orig))
    if found is None:
        return translate(exc, "write set")
    r, r_n, j, j_n, d, d_n, s, s_n, lines, lines_n = (int(x or 0) for x in found.groups())
    if r != r_n:
        return ConcurrencyError(
            f"{r_n - r} run(s) were updated concurrently or do not exist (nothing written)"
        )
    if j != j_n:
        return DuplicateError("a job with one of these ids already exists (nothing written)")
    if d != d_n:
        return ConcurrencyError(
            f"{d_n - d} job(s) are no longer leased as expected or do not exist (nothing written)"
        )
    if s != s_n:
        return ConcurrencyError(
            f"{s_n - s} stage(s) were updated concurrently or do not exist (nothing written)"
        )
    if lines != lines_n:
        return DuplicateError("a journal entry with this name, occurrence or position exists")
    return ConcurrencyError(f"the write set's events were not all appended: {exc.orig}")
