"""``write_set`` for ONE run's set, every value a scalar parameter: cheap to plan.

The general statement (``write_set.py``) joins a ``jsonb_to_recordset`` per kind to its
table and gates every later CTE on ``(SELECT count(*) FROM w_r)``: about twenty
subplans and five joins for the server to plan on every execution (every connection
plans for its parameters: ``engine.SESSION_OPTIONS``). Measured with
``EXPLAIN (SUMMARY)`` on a chained stage's set (one run, one new job, one completed
job, two stages, two events): 0.75-0.9 ms of planning, more than executing it.

A chained stage's commit is one run's set, so here each row is its own key lookup::

    WITH w_r AS (UPDATE runs SET <changed columns> = :r_... WHERE id = :r_w_id
                 AND version = :r_w_version RETURNING id),
         w_j AS (INSERT INTO jobs (...) SELECT v.* FROM w_r, (VALUES (...), ...) AS v
                 ORDER BY v.k ON CONFLICT DO NOTHING RETURNING id),
         w_d0 AS (UPDATE jobs SET status = 'COMPLETED', worker_id = NULL FROM w_r
                  WHERE id = :d0_w_id AND <still leased as expected> RETURNING t.id), ...
         w_s0 AS (UPDATE stages SET ... FROM w_r WHERE (run_id, stage_id) = (...)
                  AND version = :s0_w_version RETURNING t.run_id), ...
         e_s AS (INSERT INTO run_event_seq SELECT :r_w_id, :e_n FROM w_r ON CONFLICT ...
                 RETURNING last_sequence),
         w_e AS (INSERT INTO outbox SELECT ... FROM e_s, (VALUES (1, ...), ...) AS v ...),
         c AS MATERIALIZED (SELECT <rows written per kind>)
    SELECT c.*, CASE WHEN <every count as expected> THEN 0 ELSE CAST('<guard>' AS INTEGER)
           END, pg_notify(...) FROM c

Same guards and effects as the general statement: every later CTE joins ``w_r`` (one
row when the run still had its version, none otherwise), so it runs after the run's
row lock is taken and writes nothing when the version check failed; the counts are
computed once (``c``) and a short one fails the CAST with the same text
(``write_set.GUARD_MARK``), which aborts the whole statement. Values are bound with
their columns' types, so they are stored exactly as the per-row statements store them.

Only the run's columns that differ from ``prior`` (the run as stored, which the
version guard proves is what the row holds) are written: a stage commit changes the
status, the timestamps, the current group and the version, never the input, config or
search attributes, which the general statement rewrites (and re-toasts) each time.

Taken for one run, events of that run only, and at most ``MAX_ROWS`` rows of each
other kind (the statement's text, hence the number of prepared shapes, stays small);
any other set takes the general statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.engine import NOTIFY_CHANNEL
from treadle.adapters.sql.job_rows import _JOB_FIELDS
from treadle.adapters.sql.persistence.outbox import FEED_NOTIFY
from treadle.adapters.sql.persistence.runs import _RUN_SET, _run_values
from treadle.adapters.sql.persistence.shared import _RUN_PAYLOADS
from treadle.adapters.sql.persistence.stages import _STAGE_SET
from treadle.kernel.model import JobStatus, Run

if TYPE_CHECKING:
    from treadle.adapters.sql.persistence.write_set import SqlTransactionUnit

__all__ = ["MAX_EVENTS", "MAX_ROWS", "Shape", "fits", "run_columns", "statement"]

MAX_ROWS = 4
"""At most this many new jobs, completed jobs and stages each (a chained stage: 1, 1, 2)."""
MAX_EVENTS = 8

Shape = tuple[tuple[str, ...], int, int, bool, int, int, bool]
"""(run columns written, new jobs, completed jobs, leased, stages, events, feed)."""


def fits(run_id: str, n_jobs: int, n_done: int, n_stages: int, event_runs: Sequence[str]) -> bool:
    """Whether a set of one run (``run_id``) can take this statement."""
    return (
        n_jobs <= MAX_ROWS
        and n_done <= MAX_ROWS
        and n_stages <= MAX_ROWS
        and len(event_runs) <= MAX_EVENTS
        and all(event_run == run_id for event_run in event_runs)
    )


async def run_columns(
    tx: SqlTransactionUnit, updated: Run, prior: Run | None
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The run columns to write (those that differ from ``prior``; all without it) and
    their stored values (payloads offloaded as ``SqlRuns._run_row`` does)."""
    values = _run_values(updated)
    if prior is None:
        columns = _RUN_SET
    else:
        before = _run_values(prior)
        columns = tuple(name for name in _RUN_SET if not _same(values[name], before[name]))
    out = {name: values[name] for name in columns}
    for name in _RUN_PAYLOADS:
        if name in out:
            out[name] = await tx._put_payload(updated.id, out[name])
    return columns, out


def _same(a: Any, b: Any) -> bool:
    """Whether a column keeps its value: the same object, or an equal scalar of the same
    type (``1 == 1.0 == True`` in Python, not in JSON; a dict or list is compared by
    identity only, which ``evolve`` keeps for the fields it does not change)."""
    return a is b or (type(a) is type(b) and not isinstance(a, dict | list) and a == b)


def _p(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=column.type)


def _shape_sql(shape: Shape) -> tuple[str, list[sa.BindParameter[Any]]]:
    columns, n_jobs, n_done, leased, n_stages, n_events, feed = shape
    binds: list[sa.BindParameter[Any]] = [
        _p("r_w_id", t.runs.c.id),
        sa.bindparam("r_w_version", type_=sa.Integer()),
    ]
    assignments = []
    for name in columns:
        assignments.append(f'"{name}" = :r_{name}')
        binds.append(_p(f"r_{name}", t.runs.c[name]))
    ctes = [
        f"w_r AS (UPDATE runs SET {', '.join(assignments)} "
        "WHERE id = :r_w_id AND version = :r_w_version RETURNING id)"
    ]
    counts = {"r": "(SELECT count(*) FROM w_r)", "j": "0", "d": "0", "s": "0", "e": "0"}
    if n_jobs:
        names = ", ".join(f'"{f}"' for f in _JOB_FIELDS)
        rows = []
        for i in range(n_jobs):
            rows.append(f"({i}, " + ", ".join(f":j{i}_{f}" for f in _JOB_FIELDS) + ")")
            binds.extend(_p(f"j{i}_{f}", t.jobs.c[f]) for f in _JOB_FIELDS)
        picked = ", ".join(f'v."{f}"' for f in _JOB_FIELDS)
        ctes.append(
            f"w_j AS (INSERT INTO jobs ({names}) SELECT {picked} FROM w_r, "
            f"(VALUES {', '.join(rows)}) AS v(k, {names}) ORDER BY v.k "
            "ON CONFLICT DO NOTHING RETURNING id)"
        )
        counts["j"] = "(SELECT count(*) FROM w_j)"
    done = []
    for i in range(n_done):
        guard = ""
        binds.append(_p(f"d{i}_w_id", t.jobs.c.id))
        if leased:
            guard = (
                f" AND t.status = '{JobStatus.LEASED.value}'"
                f" AND t.worker_id = :d{i}_w_worker_id AND t.attempts = :d{i}_w_attempts"
            )
            binds.append(_p(f"d{i}_w_worker_id", t.jobs.c.worker_id))
            binds.append(_p(f"d{i}_w_attempts", t.jobs.c.attempts))
        ctes.append(
            f"w_d{i} AS (UPDATE jobs AS t SET status = '{JobStatus.COMPLETED.value}', "
            f"worker_id = NULL FROM w_r WHERE t.id = :d{i}_w_id{guard} RETURNING t.id)"
        )
        done.append(f"(SELECT count(*) FROM w_d{i})")
    if done:
        counts["d"] = " + ".join(done)
    stages = []
    for i in range(n_stages):
        sets = ", ".join(f'"{name}" = :s{i}_{name}' for name in _STAGE_SET)
        binds.extend(_p(f"s{i}_{name}", t.stages.c[name]) for name in _STAGE_SET)
        binds.append(_p(f"s{i}_w_run_id", t.stages.c.run_id))
        binds.append(_p(f"s{i}_w_stage_id", t.stages.c.stage_id))
        binds.append(sa.bindparam(f"s{i}_w_version", type_=sa.Integer()))
        ctes.append(
            f"w_s{i} AS (UPDATE stages AS t SET {sets} FROM w_r WHERE t.run_id = :s{i}_w_run_id "
            f"AND t.stage_id = :s{i}_w_stage_id AND t.version = :s{i}_w_version "
            "RETURNING t.run_id)"
        )
        stages.append(f"(SELECT count(*) FROM w_s{i})")
    if stages:
        counts["s"] = " + ".join(stages)
    if n_events:
        rows = []
        for i in range(n_events):
            rows.append(f"({i + 1}, :e{i}_type, :e{i}_event, :e{i}_at)")
            binds.append(_p(f"e{i}_type", t.outbox.c.event_type))
            binds.append(_p(f"e{i}_event", t.outbox.c.event))
            binds.append(_p(f"e{i}_at", t.outbox.c.created_at))
        sequence = f"e_s.last_sequence - {n_events} + v.k"
        ctes.append(
            "e_s AS (INSERT INTO run_event_seq (run_id, last_sequence) "
            f"SELECT w_r.id, {n_events} FROM w_r ON CONFLICT (run_id) DO UPDATE SET "
            "last_sequence = run_event_seq.last_sequence + excluded.last_sequence "
            "RETURNING last_sequence)"
        )
        ctes.append(
            "w_e AS (INSERT INTO outbox (run_id, sequence, event_type, event, created_at, "
            f"published, dead_lettered, attempts) SELECT :r_w_id, {sequence}, v.t, "
            f"jsonb_set(v.e, '{{sequence}}', to_jsonb({sequence})), v.c, false, false, 0 "
            f"FROM e_s, (VALUES {', '.join(rows)}) AS v(k, t, e, c) ORDER BY v.k "
            "RETURNING sequence)"
        )
        counts["e"] = "(SELECT count(*) FROM w_e)"
    from treadle.adapters.sql.persistence.write_set import GUARD_MARK

    kinds = ("r", "j", "d", "s", "e")
    ctes.append(
        "c AS MATERIALIZED (SELECT " + ", ".join(f"{counts[k]} AS {k}" for k in kinds) + ")"
    )
    binds.extend(sa.bindparam(f"{k}_n", type_=sa.Integer()) for k in kinds)
    ok = " AND ".join(f"c.{k} = :{k}_n" for k in kinds)
    report = " || ".join(f"' {k}=' || c.{k} || '/' || :{k}_n" for k in kinds)
    columns_out = [f"c.{k}" for k in kinds]
    columns_out.append(
        f"CASE WHEN {ok} THEN 0 ELSE CAST('{GUARD_MARK}:' || {report} AS INTEGER) END AS ok"
    )
    if n_events and feed:
        columns_out.append(f"{FEED_NOTIFY} AS feed")
    columns_out.append(
        "CASE WHEN :end_payload = '' THEN NULL ELSE pg_notify(:channel, :end_payload) END AS ended"
    )
    columns_out.append("CASE WHEN :notify_jobs THEN pg_notify(:channel, 'jobs') END AS jobs")
    binds.append(sa.bindparam("channel", value=NOTIFY_CHANNEL, type_=sa.String()))
    binds.append(sa.bindparam("end_payload", type_=sa.String()))
    binds.append(sa.bindparam("notify_jobs", type_=sa.Boolean()))
    return f"WITH {', '.join(ctes)} SELECT {', '.join(columns_out)} FROM c", binds


def statement(tx: SqlTransactionUnit, shape: Shape) -> sa.TextClause:
    """The statement of ``shape``, built once per persistence."""
    columns, *counts = shape
    name = "write_set1:" + ",".join(columns) + ":" + ",".join(str(int(c)) for c in counts)

    def build() -> sa.TextClause:
        sql, binds = _shape_sql(shape)
        return sa.text(sql).bindparams(*binds)

    built: sa.TextClause = tx.dialect.cached(name, build)
    return built


def params(
    run: Run,
    values: Mapping[str, Any],
    jobs: Sequence[Mapping[str, Any]],
    done: Sequence[Mapping[str, Any]],
    stages: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The statement's parameters: ``run`` as stored (its id and version, which the
    update expects), ``values`` its written columns, and the rows of each kind as
    ``write_set`` builds them for the general statement."""
    out: dict[str, Any] = {"r_w_id": run.id, "r_w_version": run.version}
    for name, value in values.items():
        out[f"r_{name}"] = value
    for i, row in enumerate(jobs):
        for f in _JOB_FIELDS:
            out[f"j{i}_{f}"] = row[f]
    for i, row in enumerate(done):
        out[f"d{i}_w_id"] = row["w_id"]
        out[f"d{i}_w_worker_id"] = row["w_worker_id"]
        out[f"d{i}_w_attempts"] = row["w_attempts"]
    for i, row in enumerate(stages):
        for name in _STAGE_SET:
            out[f"s{i}_{name}"] = row[name]
        out[f"s{i}_w_run_id"] = row["w_run_id"]
        out[f"s{i}_w_stage_id"] = row["w_stage_id"]
        out[f"s{i}_w_version"] = row["w_version"]
    for i, row in enumerate(events):
        out[f"e{i}_type"] = row["event_type"]
        out[f"e{i}_event"] = row["event"]
        out[f"e{i}_at"] = row["created_at"]
    return out
