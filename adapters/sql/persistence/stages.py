"""Stages of pipeline runs in the SQL adapter: the ``Stages`` concern of one
``SqlTransaction``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.sql.dialect import SetWrite
from treadle.adapters.sql.persistence.shared import (
    _STAGE_PAYLOADS,
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
    StageRun,
    StageStatus,
    evolve,
)

_STAGE_FIELDS = tuple(name for name in StageRun.model_fields if name != "workflow_run_id")


def _stage_values(stage: StageRun) -> dict[str, Any]:
    values = stage.__dict__
    out = {name: _plain(values[name]) for name in _STAGE_FIELDS}
    out["run_id"] = stage.workflow_run_id
    return out


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


def _is_blank(stage: StageRun) -> bool:
    """Whether every column of ``stage`` but its keys holds what ``_BLANK_STAGE`` does."""
    values = stage.__dict__
    return all(
        _plain(values[name]) == blank
        for name, blank in _BLANK_STAGE.items()
        if name not in _STAGE_KEYS and name in values
    )


def _by_stage_key(row: Mapping[str, Any]) -> tuple[str, str]:
    return (row["w_run_id"], row["w_stage_id"])


_UPDATE_STAGES = SetWrite(
    "update_stages", _PG_UPDATE_STAGES, _PG_STAGE_ROWS, order=_by_stage_key, sqlite=_UPDATE_STAGE
)


class SqlStages:
    """Stage rows on this transaction's connection (``tx.stages``, the ``StageStore`` port)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlUnit) -> None:
        self._tx = tx

    async def _stage_from(self, row: sa.Row[Any]) -> StageRun:
        return await self._tx.stage_from_columns(dict(row._mapping))

    async def _stage_row(self, stage: StageRun) -> dict[str, Any]:
        values = _stage_values(stage)
        for column in _STAGE_PAYLOADS:
            values[column] = await self._tx._put_payload(stage.workflow_run_id, values[column])
        return values

    async def insert_many(self, stages: Sequence[StageRun]) -> None:
        self._tx._check()
        if not stages:
            return
        ordinals = await self._ordinals_of_new(stages)
        if self._tx.dialect.set_statements:
            await self._insert_stages_pg(stages, ordinals)
        else:
            rows = []
            for stage, ordinal in zip(stages, ordinals, strict=True):
                values = await self._stage_row(stage)
                values["ordinal"] = ordinal
                rows.append(values)
            await self._tx.execute(_INSERT_STAGE, "insert stages", rows)
        for stage in stages:
            if stage.workflow_run_id in self._tx._fresh:
                self._tx._fresh[stage.workflow_run_id].add(stage.stage_id)

    async def _ordinals_of_new(self, stages: Sequence[StageRun]) -> list[int]:
        """Each new stage's ordinal (its run's next); ``DuplicateError`` for a missing run
        or a stage id the run has. Stages of runs this transaction inserted need no
        read (``run.create``: it knows their stages); others take one."""
        next_ordinal: dict[str, int] = {}
        existing: set[tuple[str, str]] = set()
        fresh = self._tx._fresh
        if all(s.workflow_run_id in fresh for s in stages):
            for run_id in dict.fromkeys(s.workflow_run_id for s in stages):
                next_ordinal[run_id] = len(fresh[run_id])
                existing.update((run_id, stage_id) for stage_id in fresh[run_id])
        else:
            params = {
                "run_ids": list(dict.fromkeys(s.workflow_run_id for s in stages)),
                "stage_ids": list(dict.fromkeys(s.stage_id for s in stages)),
            }
            slots = await self._tx.execute(_STAGE_SLOTS, "insert stages", params)
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
            await self._tx.execute(statement, "insert stages", params)
            return
        await self._tx.execute(_PLAN_CACHE_AUTO, "insert stages")
        await self._tx.execute(statement, "insert stages", params)
        await self._tx.execute(_PLAN_CACHE_DEFAULT, "insert stages")

    async def for_run(self, run_id: str) -> list[StageRun]:
        rows = await self._tx.execute(_GET_STAGES, "get stages", {"run_id": run_id})
        return [await self._stage_from(row) for row in rows]

    async def get(self, run_id: str, stage_id: str) -> StageRun | None:
        params = {"run_id": run_id, "stage_id": stage_id}
        row = (await self._tx.execute(_GET_STAGE, "get stage", params)).first()
        return await self._stage_from(row) if row is not None else None

    async def update(self, stage: StageRun) -> StageRun:
        new = evolve(stage, {"version": stage.version + 1})
        values = await self._stage_row(new)
        del values["run_id"], values["stage_id"]
        values["w_run_id"], values["w_stage_id"] = stage.workflow_run_id, stage.stage_id
        values["w_version"] = stage.version
        result = await self._tx.execute(_UPDATE_STAGE, "update stage", values)
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
            self._tx.note_due("poll", stage.next_poll_at)

    async def for_runs(self, run_ids: Sequence[str]) -> dict[str, list[StageRun]]:
        self._tx._check()
        out: dict[str, list[StageRun]] = {run_id: [] for run_id in run_ids}
        if not out:
            return out
        query = self._tx.prepared(
            "get_stages_of",
            lambda tx: (
                sa.select(t.stages)
                .where(tx.dialect.any_of(t.stages.c.run_id, "run_ids"))
                .order_by(t.stages.c.run_id, t.stages.c.execution_group, t.stages.c.ordinal)
            ),
        )
        rows = await self._tx.execute(query, "get stages", {"run_ids": list(out)})
        for row in rows:
            out[row.run_id].append(await self._stage_from(row))
        return out

    async def update_many(self, stages: Sequence[StageRun]) -> list[StageRun]:
        self._tx._check()
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
        keys = sorted({stage.workflow_run_id for stage in stages})
        result = await self._tx.dialect.write_many(
            self._tx, _UPDATE_STAGES, rows, "update stages", keys=keys
        )
        if result.rowcount != len(rows):
            params = {
                "run_ids": list({s.workflow_run_id for s in stages}),
                "stage_ids": list({s.stage_id for s in stages}),
            }
            stored = {
                (row.run_id, row.stage_id): row._mapping
                for row in await self._tx.execute(_FIND_STAGES, "update stages", params)
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

    async def due_suspended(self, now: datetime, limit: int) -> list[StageRun]:
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
        return [await self._stage_from(row) for row in await self._tx.execute(query, "due stages")]
