"""Runs in the SQL adapter: the ``Runs`` concern of one
``SqlTransaction``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.sql.dialect import SetWrite
from treadle.adapters.sql.engine import (
    NOTIFY_CHANNEL,
)
from treadle.adapters.sql.persistence.shared import (
    _RUN_PAYLOADS,
    SqlUnit,
    _not_written,
    _plain,
    _reject_duplicates,
)
from treadle.kernel.errors import (
    ConcurrencyError,
    DuplicateError,
)
from treadle.kernel.model import (
    Run,
    RunFilter,
    RunStatus,
    evolve,
)

_RUN_COLUMNS = tuple(c.name for c in t.runs.columns)


def _run_values(run: Run) -> dict[str, Any]:
    values = run.__dict__
    return {name: _plain(values[name]) for name in _RUN_COLUMNS}


_GET_RUN = sa.select(t.runs).where(t.runs.c.id == sa.bindparam("run_id"))


_UPDATE_RUN = sa.update(t.runs).where(
    t.runs.c.id == sa.bindparam("w_id"), t.runs.c.version == sa.bindparam("w_version")
)


_GET_RUNS = (
    sa.select(t.runs)
    .where(t.runs.c.id.in_(sa.bindparam("run_ids", expanding=True)))
    .order_by(t.runs.c.id)  # with FOR UPDATE: locks taken in id order (deadlock-free)
)


_RUN_SET = tuple(name for name in _RUN_COLUMNS if name != "id")


_PG_RUN_ROWS = pg_bulk.RecordSet(
    t.runs, {"w_id": "id", "w_version": "version"} | {name: name for name in _RUN_SET}
)


_PG_UPDATE_RUNS = pg_bulk.update_from(
    t.runs, _PG_RUN_ROWS, {"id": "w_id"}, {"version": "w_version"}, _RUN_SET
)


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


def _insert_run_statement(tx: SqlUnit) -> Any:
    # ON CONFLICT DO NOTHING: a duplicate does not poison a PostgreSQL transaction; the
    # caller reads the rowcount (which an INSERT reports only when asked to).
    return (
        tx.dialect.insert(t.runs).on_conflict_do_nothing().execution_options(preserve_rowcount=True)
    )


def _new_run_order(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """The order ``insert_runs`` writes runs in on PostgreSQL: by the unique keys."""
    return (row["workflow_id"], row["idempotency_key"] or "", row["id"])


_INSERT_RUNS = SetWrite(
    "insert_run",
    _PG_INSERT_RUNS,
    _PG_NEW_RUN_ROWS,
    order=_new_run_order,
    numbered=True,
    sqlite_build=_insert_run_statement,
)
_INSERT_CLAIMED_RUNS = SetWrite(
    "insert_run",
    _PG_INSERT_CLAIMED_RUNS,
    _PG_NEW_RUN_ROWS,
    order=_new_run_order,
    numbered=True,
    sqlite_build=_insert_run_statement,
)


def _by_run_key(row: Mapping[str, Any]) -> str:
    return str(row["w_id"])


_UPDATE_RUNS = SetWrite(
    "update_runs", _PG_UPDATE_RUNS, _PG_RUN_ROWS, order=_by_run_key, sqlite=_UPDATE_RUN
)


class SqlRuns:
    """Runs on this transaction's connection (``tx.runs``, the ``RunStore`` port)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlUnit) -> None:
        self._tx = tx

    async def _run_from(self, row: sa.Row[Any]) -> Run:
        return await self._tx.run_from_columns(dict(row._mapping))

    async def _run_row(self, run: Run) -> dict[str, Any]:
        values = _run_values(run)
        for column in _RUN_PAYLOADS:
            values[column] = await self._tx._put_payload(run.id, values[column])
        return values

    async def insert(self, run: Run) -> None:
        written, _ = await self._write_runs([run], "insert run")
        if written == 1:
            return
        exists = await self._tx.execute(sa.select(t.runs.c.id).where(t.runs.c.id == run.id))
        if exists.first() is not None:
            raise DuplicateError(f"run {run.id!r} already exists")
        raise DuplicateError(
            f"a {run.workflow_id!r} run with key {run.idempotency_key!r} already exists"
        )

    async def insert_many(self, runs: Sequence[Run]) -> None:
        self._tx._check()
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
        if any(run.status is RunStatus.PENDING for run in runs):
            write = _INSERT_RUNS
            self._tx._notified.add("run")  # sent by the PostgreSQL statement itself
        else:
            write = _INSERT_CLAIMED_RUNS
        result = await self._tx.dialect.write_many(self._tx, write, rows, what)
        if result.rowcount == len(runs):
            for run in runs:
                self._tx._fresh[run.id] = set()
        return int(result.rowcount), rows

    async def _not_inserted(self, runs: Sequence[Run], rows: list[dict[str, Any]]) -> list[str]:
        """After ``insert_runs`` wrote fewer rows than it had: the ids of those it did not
        write (a row stored under the id that differs from the one sent; see
        ``_not_written``)."""
        query = sa.select(t.runs).where(t.runs.c.id.in_([run.id for run in runs]))
        stored = {row.id: row._mapping for row in await self._tx.execute(query, "insert runs")}
        seen: set[str] = set()
        items = []
        for run, values in zip(runs, rows, strict=True):
            # The second occurrence of an id in the call is never the one written.
            found = None if run.id in seen else stored.get(run.id)
            seen.add(run.id)
            items.append((repr(run.id), found, values))
        return _not_written(items)

    async def find_by_keys(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Run]:
        self._tx._check()
        wanted = set(keys)
        if not wanted:
            return {}

        def build(tx: SqlUnit) -> Any:
            c = t.runs.c
            # Both columns of the unique index: a superset of the pairs, filtered below.
            return sa.select(t.runs).where(
                tx.dialect.any_of(c.workflow_id, "workflow_ids"),
                tx.dialect.any_of(c.idempotency_key, "keys"),
            )

        params = {
            "workflow_ids": sorted({w for w, _ in wanted}),
            "keys": sorted({k for _, k in wanted}),
        }
        rows = await self._tx.execute(
            self._tx.prepared("find_runs_by_keys", build), "find runs", params
        )
        found: dict[tuple[str, str], Run] = {}
        for row in rows:
            key = (row.workflow_id, row.idempotency_key)
            if key in wanted:
                found[key] = await self._run_from(row)
        return found

    async def get(self, run_id: str, *, for_update: bool = False) -> Run | None:
        query = _GET_RUN
        if for_update:
            query = self._tx.prepared("get_run_for_update", lambda tx: tx.dialect.lock(_GET_RUN))
        row = (await self._tx.execute(query, "get run", {"run_id": run_id})).first()
        return await self._run_from(row) if row is not None else None

    async def find_by_key(self, workflow_id: str, idempotency_key: str) -> Run | None:
        query = sa.select(t.runs).where(
            t.runs.c.workflow_id == workflow_id, t.runs.c.idempotency_key == idempotency_key
        )
        row = (await self._tx.execute(query, "find run by key")).first()
        return await self._run_from(row) if row is not None else None

    async def update(self, run: Run) -> Run:
        new = evolve(run, {"version": run.version + 1, "stages": []})
        values = await self._run_row(new)
        del values["id"]
        values["w_id"], values["w_version"] = run.id, run.version
        result = await self._tx.execute(_UPDATE_RUN, "update run", values)
        if result.rowcount == 1:
            if new.status.terminal:
                self._note_final(new)
            return new
        stored = (
            await self._tx.execute(sa.select(t.runs.c.version).where(t.runs.c.id == run.id))
        ).first()
        if stored is None:
            raise ConcurrencyError(f"run {run.id!r} does not exist")
        raise ConcurrencyError(
            f"run {run.id!r} was updated concurrently (version {stored.version}, "
            f"expected {run.version})"
        )

    async def get_many(self, run_ids: Sequence[str], *, for_update: bool = False) -> dict[str, Run]:
        self._tx._check()
        if not run_ids:
            return {}

        def build(tx: SqlUnit) -> Any:
            query = (
                sa.select(t.runs)
                .where(tx.dialect.any_of(t.runs.c.id, "run_ids"))
                .order_by(t.runs.c.id)  # with FOR UPDATE: locks taken in id order
            )
            return tx.dialect.lock(query) if for_update else query

        query = self._tx.prepared(f"get_runs:{for_update}", build)
        params = {"run_ids": list(dict.fromkeys(run_ids))}
        rows = await self._tx.execute(query, "get runs", params)
        return {row.id: await self._run_from(row) for row in rows}

    async def update_many(self, runs: Sequence[Run]) -> list[Run]:
        self._tx._check()
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
        # supports_sane_multi_rowcount vouches for): ``SqlDialect.write_many``. A short
        # count means a stale or missing run.
        keys = sorted(run.id for run in runs)
        result = await self._tx.dialect.write_many(
            self._tx, _UPDATE_RUNS, rows, "update runs", keys=keys
        )
        if result.rowcount != len(rows):
            params = {"run_ids": [r.id for r in runs]}
            stored = {
                row.id: row._mapping
                for row in await self._tx.execute(_GET_RUNS, "update runs", params)
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
        if self._tx.final_runs is None:
            self._tx.final_runs = {}
        self._tx.final_runs[run.id] = run

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
        if f.updated_after is not None:
            conditions.append(c.updated_at >= f.updated_after)
        if f.updated_before is not None:
            conditions.append(c.updated_at < f.updated_before)
        if f.after is not None:
            # Row-value comparison: one range on the (created_at, id) index.
            created_at, run_id = f.after
            conditions.append(
                sa.tuple_(c.created_at, c.id)
                < sa.tuple_(
                    sa.literal(created_at, type_=c.created_at.type),
                    sa.literal(run_id, type_=c.id.type),
                )
            )
        if f.parent_run_id is not None:
            conditions.append(c.parent_run_id == f.parent_run_id)
        if f.paused is not None:
            live = c.status.in_([s.value for s in RunStatus if not s.terminal])
            paused = sa.and_(c.paused.is_(True), live)
            conditions.append(paused if f.paused else sa.not_(paused))
        conditions.extend(self._tx.dialect.attributes_match(c.search_attributes, f.attributes))
        return conditions

    async def query(self, filter: RunFilter) -> list[Run]:
        columns: list[Any] = [t.runs]
        if not filter.payloads:  # the other columns, and NULL for the payload ones
            columns = [sa.null().label(c.name) if c.name in _RUN_PAYLOADS else c for c in t.runs.c]
        query = (
            sa.select(*columns)
            .where(*self._run_conditions(filter))
            .order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc())
            .offset(filter.offset)
            .limit(filter.limit)
        )
        return [await self._run_from(row) for row in await self._tx.execute(query, "list runs")]

    async def count(self, group_by: str, filter: RunFilter) -> dict[str, int]:
        if group_by not in ("status", "workflow_id"):
            raise ValueError(f"cannot group runs by {group_by!r}")
        column = t.runs.c[group_by]
        query = (
            sa.select(column, sa.func.count()).where(*self._run_conditions(filter)).group_by(column)
        )
        return {str(row[0]): int(row[1]) for row in await self._tx.execute(query, "count runs")}

    async def claim_pending(
        self,
        limit: int,
        *,
        exclude_ids: Sequence[str] = (),
        exclude_keys: Sequence[tuple[str, str | None]] = (),
    ) -> list[Run]:
        if exclude_ids or exclude_keys:
            return await self._claim_pending_excluding(limit, exclude_ids, exclude_keys)

        def build(tx: SqlUnit) -> Any:
            query = (
                sa.select(t.runs)
                .where(t.runs.c.status == RunStatus.PENDING.value, t.runs.c.paused.is_(False))
                .order_by(t.runs.c.priority.desc(), t.runs.c.created_at, t.runs.c.id)
                .limit(sa.bindparam("limit", type_=sa.Integer()))
            )
            return tx.dialect.lock(query, skip_locked=True)

        # Built once: a worker whose slots free one by one claims once per freed slot.
        query = self._tx.prepared("claim_pending_runs", build)
        rows = await self._tx.execute(query, "claim pending runs", {"limit": limit})
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
        locked = self._tx.dialect.lock(query, skip_locked=True)
        rows = await self._tx.execute(locked, "claim pending runs")
        return [await self._run_from(row) for row in rows]

    async def inactive_since(self, status: RunStatus, cutoff: datetime, limit: int) -> list[Run]:
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
        return [await self._run_from(row) for row in await self._tx.execute(query, "inactive runs")]
