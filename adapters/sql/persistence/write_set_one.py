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
from typing import Any, Protocol

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.engine import NOTIFY_CHANNEL
from treadle.adapters.sql.job_rows import _JOB_FIELDS
from treadle.adapters.sql.persistence.outbox import FEED_NOTIFY
from treadle.adapters.sql.persistence.runs import _RUN_SET, _run_values
from treadle.adapters.sql.persistence.shared import _RUN_PAYLOADS
from treadle.adapters.sql.persistence.stages import _STAGE_SET
from treadle.kernel.model import JobStatus, Run


class _Unit(Protocol):
    """What this module uses of a ``SqlTransaction`` (``write_set.py`` imports this
    module, so it names none of that one's types)."""

    dialect: Any

    async def _put_payload(self, scope: str | None, value: Any) -> Any: ...


GUARD_MARK = "treadle write_set guard"
"""The text of the error the statement raises when a guard fails (``write_set.py``'s
statement raises the same)."""

__all__ = [
    "GUARD_MARK",
    "MAX_EVENTS",
    "MAX_ROWS",
    "Shape",
    "fits",
    "params",
    "run_columns",
    "stage_columns",
    "statement",
]

MAX_ROWS = 4
"""At most this many new jobs, completed jobs and stages each (a chained stage: 1, 1, 2)."""
MAX_EVENTS = 8

Shape = tuple[tuple[str, ...], int, int, bool, tuple[tuple[str, ...], ...], int, bool]
"""(run columns written, new jobs, completed jobs, leased, each stage's columns
written, events, feed)."""


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
    tx: _Unit, updated: Run, prior: Run | None
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


def stage_columns(values: Mapping[str, Any], prior: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The stage columns to write: those whose stored values (``SqlStages._stage_row``)
    differ from ``prior``'s (the stage as stored); all without it."""
    if prior is None:
        return _STAGE_SET
    return tuple(name for name in _STAGE_SET if not _same(values[name], prior[name]))


def _p(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=column.type)


_RUN_INDEX = {name: i for i, name in enumerate(_RUN_SET)}
_STAGE_INDEX = {name: i for i, name in enumerate(_STAGE_SET)}


def _shape_sql(shape: Shape) -> tuple[str, list[sa.BindParameter[Any]]]:
    """The statement of ``shape`` and its parameters. Parameters have short names and
    the expected counts are literals: psycopg caches its conversion of a statement to
    the server's placeholders only up to 4 KiB of text and 50 parameters, and converts
    a longer one again on every execution (about 0.3 ms of client CPU here)."""
    columns, n_jobs, n_done, leased, stage_sets, n_events, feed = shape
    binds: list[sa.BindParameter[Any]] = [_p("rk", t.runs.c.id), _p("rv", t.runs.c.version)]
    assignments = []
    for name in columns:
        param = f"r{_RUN_INDEX[name]}"
        assignments.append(f"{name} = :{param}")
        binds.append(_p(param, t.runs.c[name]))
    ctes = [
        f"w_r AS (UPDATE runs SET {', '.join(assignments)} "
        "WHERE id = :rk AND version = :rv RETURNING id)"
    ]
    counts = {"r": "(SELECT count(*) FROM w_r)", "j": "0", "d": "0", "s": "0", "e": "0"}
    expected = {"r": 1, "j": n_jobs, "d": n_done, "s": len(stage_sets), "e": n_events}
    if n_jobs:
        names = ", ".join(_JOB_FIELDS)
        picked = ", ".join(f"v.{f}" for f in _JOB_FIELDS)
        rows = []
        for i in range(n_jobs):
            rows.append(f"({i}, " + ", ".join(f":j{i}_{k}" for k in range(len(_JOB_FIELDS))) + ")")
            binds.extend(_p(f"j{i}_{k}", t.jobs.c[f]) for k, f in enumerate(_JOB_FIELDS))
        ctes.append(
            f"w_j AS (INSERT INTO jobs ({names}) SELECT {picked} FROM w_r, "
            f"(VALUES {', '.join(rows)}) AS v(k, {names}) ORDER BY v.k "
            "ON CONFLICT DO NOTHING RETURNING 1)"
        )
        counts["j"] = "(SELECT count(*) FROM w_j)"
    done = []
    for i in range(n_done):
        guard = ""
        binds.append(_p(f"d{i}", t.jobs.c.id))
        if leased:
            guard = (
                f" AND t.status = '{JobStatus.LEASED.value}'"
                f" AND t.worker_id = :d{i}w AND t.attempts = :d{i}a"
            )
            binds.append(_p(f"d{i}w", t.jobs.c.worker_id))
            binds.append(_p(f"d{i}a", t.jobs.c.attempts))
        ctes.append(
            f"w_d{i} AS (UPDATE jobs AS t SET status = '{JobStatus.COMPLETED.value}', "
            f"worker_id = NULL FROM w_r WHERE t.id = :d{i}{guard} RETURNING 1)"
        )
        done.append(f"(SELECT count(*) FROM w_d{i})")
    if done:
        counts["d"] = " + ".join(done)
    stages = []
    for i, stage_columns_written in enumerate(stage_sets):
        sets = []
        for name in stage_columns_written:
            param = f"s{i}_{_STAGE_INDEX[name]}"
            sets.append(f"{name} = :{param}")
            binds.append(_p(param, t.stages.c[name]))
        binds.append(_p(f"s{i}r", t.stages.c.run_id))
        binds.append(_p(f"s{i}s", t.stages.c.stage_id))
        binds.append(_p(f"s{i}v", t.stages.c.version))
        ctes.append(
            f"w_s{i} AS (UPDATE stages AS t SET {', '.join(sets)} FROM w_r "
            f"WHERE t.run_id = :s{i}r AND t.stage_id = :s{i}s AND t.version = :s{i}v "
            "RETURNING 1)"
        )
        stages.append(f"(SELECT count(*) FROM w_s{i})")
    if stages:
        counts["s"] = " + ".join(stages)
    if n_events:
        rows = []
        for i in range(n_events):
            rows.append(f"({i + 1}, :e{i}t, :e{i}e, :e{i}c)")
            binds.append(_p(f"e{i}t", t.outbox.c.event_type))
            binds.append(_p(f"e{i}e", t.outbox.c.event))
            binds.append(_p(f"e{i}c", t.outbox.c.created_at))
        sequence = f"e_s.last_sequence - {n_events} + v.k"
        ctes.append(
            "e_s AS (INSERT INTO run_event_seq (run_id, last_sequence) "
            f"SELECT w_r.id, {n_events} FROM w_r ON CONFLICT (run_id) DO UPDATE SET "
            "last_sequence = run_event_seq.last_sequence + excluded.last_sequence "
            "RETURNING last_sequence)"
        )
        ctes.append(
            "w_e AS (INSERT INTO outbox (run_id, sequence, event_type, event, created_at, "
            f"published, dead_lettered, attempts) SELECT :rk, {sequence}, v.t, "
            f"jsonb_set(v.e, '{{sequence}}', to_jsonb({sequence})), v.c, false, false, 0 "
            f"FROM e_s, (VALUES {', '.join(rows)}) AS v(k, t, e, c) ORDER BY v.k "
            "RETURNING 1)"
        )
        counts["e"] = "(SELECT count(*) FROM w_e)"
    kinds = ("r", "j", "d", "s", "e")
    ctes.append(
        "c AS MATERIALIZED (SELECT " + ", ".join(f"{counts[k]} AS {k}" for k in kinds) + ")"
    )
    ok = " AND ".join(f"c.{k} = {expected[k]}" for k in kinds)
    report = " || ".join(f"' {k}=' || c.{k} || '/{expected[k]}'" for k in kinds)
    columns_out = [f"c.{k}" for k in kinds]
    columns_out.append(f"CASE WHEN {ok} THEN 0 ELSE CAST('{GUARD_MARK}:' || {report} AS INT) END")
    if n_events and feed:
        columns_out.append(FEED_NOTIFY)
    columns_out.append(f"CASE WHEN :nj THEN pg_notify('{NOTIFY_CHANNEL}', 'jobs') END")
    binds.append(sa.bindparam("nj", type_=sa.Boolean()))
    return f"WITH {', '.join(ctes)} SELECT {', '.join(columns_out)} FROM c", binds


def statement(tx: _Unit, shape: Shape) -> sa.TextClause:
    """The statement of ``shape``, built once per persistence."""
    columns, n_jobs, n_done, leased, stage_sets, n_events, feed = shape
    name = (
        f"write_set1:{','.join(columns)}:{n_jobs}:{n_done}:{int(leased)}:"
        f"{'/'.join(','.join(s) for s in stage_sets)}:{n_events}:{int(feed)}"
    )

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
    stages: Sequence[tuple[Mapping[str, Any], tuple[str, ...]]],
    events: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The statement's parameters: ``run`` as stored (its id and version, which the
    update expects), ``values`` its written columns, the rows of the other kinds as
    ``write_set`` builds them for the general statement (each stage with the columns
    it writes)."""
    out: dict[str, Any] = {"rk": run.id, "rv": run.version}
    for name, value in values.items():
        out[f"r{_RUN_INDEX[name]}"] = value
    for i, row in enumerate(jobs):
        for k, f in enumerate(_JOB_FIELDS):
            out[f"j{i}_{k}"] = row[f]
    for i, row in enumerate(done):
        out[f"d{i}"] = row["w_id"]
        out[f"d{i}w"] = row["w_worker_id"]
        out[f"d{i}a"] = row["w_attempts"]
    for i, (row, columns) in enumerate(stages):
        for name in columns:
            out[f"s{i}_{_STAGE_INDEX[name]}"] = row[name]
        out[f"s{i}r"] = row["w_run_id"]
        out[f"s{i}s"] = row["w_stage_id"]
        out[f"s{i}v"] = row["w_version"]
    for i, row in enumerate(events):
        out[f"e{i}t"] = row["event_type"]
        out[f"e{i}e"] = row["event"]
        out[f"e{i}c"] = row["created_at"]
    return out
