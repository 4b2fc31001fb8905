"""``tx.insert_set`` on PostgreSQL: a start's inserts in ONE statement.

``run.create`` claimed for an in-process worker (``kernel/handlers/runs.py``
``_insert_claimed``) inserts the run RUNNING, its first job LEASED, its stages and its
events: per kind one statement each, five round trips with ``BEGIN`` and ``COMMIT``
(about 2 ms of server time per start, measured in the PostgreSQL log). Here they are
the data-modifying CTEs of one ``WITH ... SELECT``, built from the per-kind statements'
pieces (``pg_bulk.insert_select_sql``, ``outbox.pg_append_events_ctes``)::

    WITH w_r AS (INSERT INTO runs ... ON CONFLICT DO NOTHING RETURNING id),
         w_j AS (INSERT INTO jobs ... WHERE <gate> ON CONFLICT DO NOTHING RETURNING id),
         w_s AS (INSERT INTO stages ... WHERE <gate> RETURNING run_id),
         e_v, e_n, e_s AS (INSERT INTO run_event_seq ... WHERE <gate> ...), e_q,
         w_e AS (INSERT INTO outbox ... RETURNING run_id, sequence)
    SELECT <rows inserted per CTE>, CASE WHEN <every count as expected> THEN 0
           ELSE CAST('treadle insert_set guard: ...' AS INTEGER) END, pg_notify(...)

``<gate>`` is ``(SELECT count(*) FROM w_r) = :r_n``: nothing else is inserted unless
every run was (a run id or a workflow's idempotency key already taken leaves its run
out); a short count of any kind fails the CAST, which aborts the statement, so nothing
is written, and ``insert_set`` raises what the per-kind call would have
(``DuplicateError``). The stages' foreign key checks run at the end of the statement,
when the runs inserted by ``w_r`` are there. With ``last`` and nothing sent yet in the
transaction, the statement goes without ``BEGIN``/``COMMIT`` (``write_set._alone``):
one round trip for the whole start.

Not taken (``False``, nothing written; the caller makes the per-kind calls): SQLite, a
job transport other than this persistence's, events whose JSON goes to the blob store.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.sql.engine import NOTIFY_CHANNEL
from treadle.adapters.sql.errors import translate
from treadle.adapters.sql.job_rows import _JOB_FIELDS, _PG_JOB_ROWS, _available_later, job_rows
from treadle.adapters.sql.persistence.outbox import (
    _PG_OUTBOX_ROWS,
    FEED_NOTIFY,
    inline_event_rows,
    pg_append_events_ctes,
)
from treadle.adapters.sql.persistence.runs import _PG_NEW_RUN_ROWS, _RUN_COLUMNS
from treadle.adapters.sql.persistence.shared import _reject_duplicates
from treadle.adapters.sql.persistence.stages import (
    _BLANK_STAGE,
    _CACHED_CHECKS_FROM,
    _PG_BLANK_STAGE_ROWS,
    _PG_NEW_STAGE_ROWS,
    _PLAN_CACHE_AUTO,
    _PLAN_CACHE_DEFAULT,
    _STAGE_COLUMNS,
    _STAGE_KEYS,
    _is_blank,
)
from treadle.adapters.sql.persistence.write_set import (
    SqlTransactionUnit,
    _alone,
    _transactional_again,
)
from treadle.kernel.errors import DuplicateError, StorageError
from treadle.kernel.events import EventBase
from treadle.kernel.model import Job, JobStatus, Run, RunStatus, StageRun

__all__ = ["INSERT_GUARD_MARK", "insert_set"]

INSERT_GUARD_MARK = "treadle insert_set guard"
"""The text of the error the statement raises when a guard fails."""

_GUARD_RE = re.compile(INSERT_GUARD_MARK + r": r=(\d+)/(\d+) j=(\d+)/(\d+) s=(\d+)/(\d+)")

_GATE = "(SELECT count(*) FROM w_r) = :r_n"

_KINDS = ("r", "j", "s", "e")


def _stage_columns(blank: bool) -> tuple[pg_bulk.RecordSet, dict[str, str]]:
    """The stages' record set and column expressions: blank stages (PENDING, nothing
    else set: what ``run.create`` makes) send only their keys, as ``insert_stages``."""
    if blank:
        return _PG_BLANK_STAGE_ROWS, {
            name: _PG_BLANK_STAGE_ROWS.value(name) for name in _STAGE_KEYS
        } | {
            name: pg_bulk.literal(t.stages.c[name], _BLANK_STAGE[name])
            for name in _STAGE_COLUMNS
            if name not in _STAGE_KEYS
        }
    return _PG_NEW_STAGE_ROWS, {name: _PG_NEW_STAGE_ROWS.value(name) for name in _STAGE_COLUMNS}


def _shape_sql(jobs: bool, stages: bool, events: bool, feed: bool, blank: bool) -> str:
    ctes = [
        "w_r AS ("
        + pg_bulk.insert_select_sql(
            t.runs,
            _PG_NEW_RUN_ROWS,
            {name: _PG_NEW_RUN_ROWS.value(name) for name in _RUN_COLUMNS},
            order_by="i",  # key order, as ``SqlRuns._write_runs``
            suffix="ON CONFLICT DO NOTHING RETURNING id",
            rows="r_rows",
        )
        + ")"
    ]
    counts = {"r": "(SELECT count(*) FROM w_r)", "j": "0", "s": "0", "e": "0"}
    if jobs:
        ctes.append(
            "w_j AS ("
            + pg_bulk.insert_select_sql(
                t.jobs,
                _PG_JOB_ROWS,
                {name: _PG_JOB_ROWS.value(name) for name in _JOB_FIELDS},
                order_by="i",
                suffix="ON CONFLICT DO NOTHING RETURNING id",
                rows="j_rows",
                where=_GATE,
            )
            + ")"
        )
        counts["j"] = "(SELECT count(*) FROM w_j)"
    if stages:
        ctes.append(
            "w_s AS ("
            + pg_bulk.insert_select_sql(
                t.stages,
                *_stage_columns(blank),
                order_by="ordinal",
                suffix="RETURNING run_id",
                rows="s_rows",
                where=_GATE,
            )
            + ")"
        )
        counts["s"] = "(SELECT count(*) FROM w_s)"
    if events:
        event_ctes, insert = pg_append_events_ctes(rows="e_rows", prefix="e_", where=_GATE)
        ctes.extend(event_ctes)
        ctes.append(f"w_e AS ({insert})")
        counts["e"] = "(SELECT count(*) FROM w_e)"
    ctes.append(
        "c AS MATERIALIZED (SELECT " + ", ".join(f"{counts[k]} AS {k}" for k in _KINDS) + ")"
    )
    ok = " AND ".join(f"c.{k} = :{k}_n" for k in _KINDS)
    report = " || ".join(f"' {k}=' || c.{k} || '/' || :{k}_n" for k in _KINDS)
    columns = [f"c.{k}" for k in _KINDS]
    columns.append(
        f"CASE WHEN {ok} THEN 0 ELSE CAST('{INSERT_GUARD_MARK}:' || {report} AS INTEGER) END AS ok"
    )
    if events and feed:
        columns.append(f"{FEED_NOTIFY} AS feed")
    columns.append("CASE WHEN :notify_jobs THEN pg_notify(:channel, 'jobs') END AS jobs")
    columns.append(f"CASE WHEN :notify_run THEN pg_notify('{NOTIFY_CHANNEL}', 'run') END AS run")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(columns)} FROM c"


def _statement(tx: SqlTransactionUnit, shape: tuple[bool, bool, bool, bool, bool]) -> sa.TextClause:
    name = "insert_set:" + "".join("1" if part else "0" for part in shape)

    def build() -> sa.TextClause:
        jobs, stages, events, _, _ = shape
        present = {"j": jobs, "s": stages, "e": events}
        return sa.text(_shape_sql(*shape)).bindparams(
            sa.bindparam("channel", value=NOTIFY_CHANNEL),
            sa.bindparam("notify_jobs", type_=sa.Boolean()),
            sa.bindparam("notify_run", type_=sa.Boolean()),
            *(sa.bindparam(f"{k}_n", type_=sa.Integer()) for k in _KINDS),
            *(sa.bindparam(f"{k}_rows", type_=sa.Text()) for k, on in present.items() if on),
            sa.bindparam("r_rows", type_=sa.Text()),
        )

    statement: sa.TextClause = tx.dialect.cached(name, build)
    return statement


async def insert_set(
    tx: SqlTransactionUnit,
    transport: Any,
    *,
    runs: Sequence[Run],
    new_jobs: Sequence[Job],
    stages: Sequence[StageRun],
    events: Sequence[EventBase],
    last: bool = False,
) -> bool:
    """``InsertSetStore.insert_set`` on a ``SqlTransaction`` (see the module docstring)."""
    tx._check()
    persistence = getattr(transport, "persistence", None)
    if (
        not tx.dialect.set_statements
        or not runs
        or getattr(persistence, "dialect", None) is not tx.dialect
    ):
        return False
    found_rows = inline_event_rows(tx, events)
    if found_rows is None:
        return False
    event_rows = found_rows
    _reject_duplicates([run.id for run in runs], "run")
    _reject_duplicates([(s.workflow_run_id, s.stage_id) for s in stages], "stage")
    if len({j.id for j in new_jobs}) != len(new_jobs):
        return False  # the per-kind calls say which
    new_ids = {run.id for run in runs}
    if any(s.workflow_run_id not in new_ids for s in stages):
        return False  # stages of a run stored already: their ordinals take a read
    # Runs in key order (``SqlRuns._write_runs``: concurrent inserts of the same keys
    # take them in one order and wait instead of deadlocking).
    run_rows: list[dict[str, Any]] = []
    for run in sorted(runs, key=lambda r: (r.workflow_id, r.idempotency_key or "", r.id)):
        values = await tx.runs._run_row(run)
        values["i"] = len(run_rows)
        run_rows.append(values)
    params: dict[str, Any] = dict(_PG_NEW_RUN_ROWS.encode(run_rows, "r_rows"))
    params["r_n"] = len(run_rows)
    rows = job_rows(new_jobs)
    for i, row in enumerate(rows):
        row["i"] = i
    if rows:
        params |= _PG_JOB_ROWS.encode(rows, "j_rows")
    params["j_n"] = len(rows)
    notify_jobs = any(row["status"] == JobStatus.QUEUED.value for row in rows)
    # Stages: each run's next ordinal, from 0 (its runs are new).
    next_ordinal: dict[str, int] = {}
    stage_rows: list[dict[str, Any]] = []
    blank = all(_is_blank(stage) for stage in stages)
    for stage in stages:
        ordinal = next_ordinal.get(stage.workflow_run_id, 0)
        next_ordinal[stage.workflow_run_id] = ordinal + 1
        if blank:
            stage_rows.append(
                {
                    "run_id": stage.workflow_run_id,
                    "stage_id": stage.stage_id,
                    "ordinal": ordinal,
                    "execution_group": stage.execution_group,
                }
            )
        else:
            values = await tx.stages._stage_row(stage)
            values["ordinal"] = ordinal
            stage_rows.append(values)
    if stage_rows:
        records = _PG_BLANK_STAGE_ROWS if blank else _PG_NEW_STAGE_ROWS
        params |= records.encode(stage_rows, "s_rows")
    params["s_n"] = len(stage_rows)
    if event_rows:
        params |= _PG_OUTBOX_ROWS.encode(event_rows, "e_rows")
    params["e_n"] = len(event_rows)
    if event_rows:
        tx.outbox._note_ended(event_rows)  # the NOTIFY is the runs trigger's (wake_interest)
    params["notify_jobs"] = notify_jobs and "jobs" not in tx._notified
    # A PENDING run is claimable work: the NOTIFY ``SqlRuns._write_runs`` sends.
    params["notify_run"] = any(run.status is RunStatus.PENDING for run in runs) and (
        "run" not in tx._notified
    )
    shape = (bool(rows), bool(stage_rows), bool(event_rows), tx.notify_events, blank)
    statement = _statement(tx, shape)
    tx._check()
    for job in new_jobs:
        if _available_later(job):
            tx.note_due("job", job.next_poll_at)
    # Many stages: their foreign key checks' query planned once, not once per row
    # (``SqlStages._insert_stages_pg``), around the statement, in the transaction.
    many = len(stage_rows) >= _CACHED_CHECKS_FROM
    alone = last and not many and tx.due is None and not tx.created_blobs
    driver = await _alone(tx) if alone else None
    try:
        if many:
            await tx.execute(_PLAN_CACHE_AUTO, "insert set")
        await tx.connection.execute(statement, params)
        if many:
            await tx.execute(_PLAN_CACHE_DEFAULT, "insert set")
    except sa_exc.DBAPIError as exc:
        raise _guard_error(exc, runs) from exc
    finally:
        if driver is not None:
            await _transactional_again(tx, driver)
    if driver is not None:
        tx.active = False  # committed: a further statement could not join it
    # What the per-kind calls note for after the commit (and for later statements of
    # this transaction: the stages of these runs are known without a read).
    if event_rows:
        tx.appended_events = True
    if params["notify_jobs"]:
        tx._notified.add("jobs")
    if params["notify_run"]:
        tx._notified.add("run")
    for row in rows:
        if row["status"] == JobStatus.QUEUED.value:
            tx.note_queued(str(row["queue"]))
    fresh = tx._fresh
    for run in runs:
        fresh[run.id] = set()
    for stage in stages:
        fresh[stage.workflow_run_id].add(stage.stage_id)
    for run in runs:
        if run.status.terminal:
            tx.runs._note_final(run)
    return True


def _guard_error(exc: sa_exc.DBAPIError, runs: Sequence[Run]) -> Exception:
    """The error of a failed statement: the per-kind call's for a failed guard."""
    found = _GUARD_RE.search(str(exc.orig))
    if found is None:
        return translate(exc, "insert set")
    r, r_n, j, j_n, s, s_n = (int(x) for x in found.groups())
    if r != r_n:
        if len(runs) == 1:
            (run,) = runs
            return DuplicateError(
                f"run {run.id!r} already exists, or a {run.workflow_id!r} run with key "
                f"{run.idempotency_key!r} (nothing written)"
            )
        named = ", ".join(repr(run.id) for run in runs[:20])
        return DuplicateError(
            f"{r_n - r} of run(s) {named} already exist (the same id, or the same workflow "
            "and idempotency key; nothing written)"
        )
    if j != j_n:
        return DuplicateError("a job with one of these ids already exists (nothing written)")
    if s != s_n:
        return DuplicateError(f"{s_n - s} stage(s) were not inserted (nothing written)")
    return StorageError(f"the insert set's events were not all appended: {exc.orig}")
