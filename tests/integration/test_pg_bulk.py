"""PostgreSQL's set-oriented writes store exactly what the per-row statements store.

``update_stages``, ``update_runs``, ``put_idempotency_many``, ``append_events`` and
``enqueue`` send their rows as one JSON parameter (adapters/sql/pg_bulk.py). Here the
same values are written once through that path and once through a per-row statement
(the single-row method, or SQLAlchemy's INSERT of the table), and the two rows must be
identical as the server holds them: every column's text (``to_jsonb`` of the row) and
which JSON columns are SQL NULL rather than the JSON ``null``. A NUL character still
fails the write as a ``StorageError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from treadle.adapters.sql import SqlJobTransport, SqlPersistence
from treadle.adapters.sql import schema as t
from treadle.kernel.errors import StorageError
from treadle.kernel.events import StageCompleted
from treadle.kernel.model import (
    IdempotencyRecord,
    IdempotencyState,
    Job,
    JobStatus,
    Run,
    RunStatus,
    StageRun,
    StageStatus,
    evolve,
)

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
ODD_ZONE = timezone(timedelta(hours=5, minutes=30, seconds=15))
JSON_VALUES: list[Any] = [
    None,
    {"b": 1, "a": {"z": [1, 2.5, None, True, False, "x"]}, "": {}},
    'café ☃ 𝄞 \u2028 " \\ \n',
    2**80,
    1e300,
    1e16,
    -0.0,
    0.1,
    [],
    "null",
]


@pytest.fixture
async def persistence(postgres_url: str) -> AsyncIterator[SqlPersistence]:
    made = await SqlPersistence.open(postgres_url, migrate=True)
    try:
        yield made
    finally:
        await made.aclose()


async def raw(persistence: SqlPersistence, table: sa.Table, drop: tuple[str, ...]) -> list[Any]:
    """Each row of ``table`` as the server holds it, without the columns ``drop`` (keys
    and serial ids, which differ by construction), plus which JSON columns are NULL."""
    jsons = [c.name for c in table.columns if isinstance(c.type, sa.JSON)]
    removed = "".join(f" - '{name}'" for name in drop)
    nulls = "".join(f", {name} IS NULL" for name in jsons)
    order = ", ".join(c.name for c in table.primary_key.columns)
    query = sa.text(
        f"SELECT CAST(to_jsonb(x){removed} AS text){nulls} FROM {table.name} AS x ORDER BY {order}"
    )
    async with persistence.transaction() as tx:
        return [tuple(row) for row in await tx.execute(query)]


def stage_values(i: int) -> dict[str, Any]:
    n = len(JSON_VALUES)
    return {
        "status": StageStatus.SUSPENDED,
        "attempt": i,
        "output": JSON_VALUES[i % n],
        "error": None if i % 2 else "é\ttab",
        "retryable": [None, True, False][i % 3],
        "started_at": datetime(2026, 3, 4, 5, 6, 7, 1),  # naive: taken as UTC
        "completed_at": datetime(2026, 3, 4, 10, 36, 7, 999999, tzinfo=ODD_ZONE),
        "suspended_state": JSON_VALUES[(i + 1) % n],
        "next_poll_at": None,
        "poll_interval": [None, timedelta(days=2, microseconds=3), timedelta(0)][i % 3],
        "suspend_deadline": T0,
        "resume_state": JSON_VALUES[(i + 2) % n],
        "job_id": None,
    }


async def test_update_stages_stores_what_update_stage_stores(persistence: SqlPersistence) -> None:
    count = len(JSON_VALUES) * 3
    async with persistence.transaction() as tx:
        for i in range(count):
            await tx.runs.insert(Run(id=f"r{i:03}", workflow_id="wf", created_at=T0, updated_at=T0))
        await tx.stages.insert_many(
            [
                StageRun(workflow_run_id=f"r{i:03}", stage_id=s, execution_group=0)
                for i in range(count)
                for s in ("bulk", "single")
            ]
        )
    async with persistence.transaction() as tx:
        stages = await tx.stages.for_runs([f"r{i:03}" for i in range(count)])
        bulk = [evolve(stages[f"r{i:03}"][0], stage_values(i)) for i in range(count)]
        await tx.stages.update_many(bulk)
        for i in range(count):
            await tx.stages.update(evolve(stages[f"r{i:03}"][1], stage_values(i)))
    rows = await raw(persistence, t.stages, ("stage_id", "ordinal"))
    assert rows[0::2] == rows[1::2]  # ordered by (run_id, stage_id): bulk, single
    assert any(row[1:] == (False, False, False) for row in rows)  # None is JSON null


async def test_update_runs_stores_what_update_run_stores(persistence: SqlPersistence) -> None:
    n = len(JSON_VALUES)
    async with persistence.transaction() as tx:
        for i in range(2 * n):
            await tx.runs.insert(Run(id=f"r{i:03}", workflow_id="wf", created_at=T0, updated_at=T0))
    async with persistence.transaction() as tx:
        runs = await tx.runs.get_many([f"r{i:03}" for i in range(2 * n)])
        changes = [
            {
                "status": RunStatus.RUNNING,
                "input": JSON_VALUES[i],
                "output": JSON_VALUES[(i + 3) % n],
                "config": {"v": JSON_VALUES[(i + 1) % n]},
                "search_attributes": {"k": JSON_VALUES[(i + 2) % n]},
                "started_at": datetime(2026, 3, 4, 5, 6, 7, 1),
                "updated_at": datetime(2026, 3, 4, 10, 36, 7, 5, tzinfo=ODD_ZONE),
                "worker_id": "wörker",
                "current_group": i,
            }
            for i in range(n)
        ]
        await tx.runs.update_many([evolve(runs[f"r{i:03}"], changes[i]) for i in range(n)])
        for i in range(n):
            await tx.runs.update(evolve(runs[f"r{n + i:03}"], changes[i]))
    rows = await raw(persistence, t.runs, ("id",))
    assert rows[:n] == rows[n:]


async def test_put_idempotency_many_stores_what_put_idempotency_stores(
    persistence: SqlPersistence,
) -> None:
    def record(key: str, i: int) -> IdempotencyRecord:
        return IdempotencyRecord(
            key=key,
            command_type="job.execute",
            state=IdempotencyState.COMPLETED,
            result=JSON_VALUES[i],
            started_at=datetime(2026, 3, 4, 10, 36, 7, 999999, tzinfo=ODD_ZONE),
        )

    n = len(JSON_VALUES)
    async with persistence.transaction() as tx:
        await tx.idempotency.put_many([record(f"a{i:02}", i) for i in range(n)])
        for i in range(n):
            await tx.idempotency.put(record(f"b{i:02}", i))
    rows = await raw(persistence, t.idempotency_keys, ("key",))
    assert rows[:n] == rows[n:]


async def test_append_events_and_enqueue_store_what_a_per_row_insert_stores(
    persistence: SqlPersistence,
) -> None:
    events = [
        StageCompleted(
            workflow_run_id="r1",
            stage_id="s",
            attempt=1,
            output=value,
            duration=timedelta(microseconds=1),
            timestamp=datetime(2026, 3, 4, 10, 36, 7, 999999, tzinfo=ODD_ZONE),
        )
        for value in JSON_VALUES
    ]
    job = Job(
        id="bulk",
        workflow_run_id="r1",
        workflow_id="wf",
        stage_id="s",
        next_poll_at=datetime(2026, 3, 4, 5, 6, 7, 1),
        enqueued_at=datetime(2026, 3, 4, 10, 36, 7, 999999, tzinfo=ODD_ZONE),
        last_error="ë",
    )
    async with persistence.transaction() as tx:
        stored = await tx.outbox.append(events)
        await SqlJobTransport(persistence).enqueue(tx, [job])
        for event in stored:  # the same rows again, one SQLAlchemy INSERT each
            values = {
                "run_id": "r2",
                "sequence": event.sequence,
                "event_type": event.type,
                "event": event.model_dump(mode="json"),
                "created_at": event.timestamp,
                "published": False,
                "dead_lettered": False,
                "attempts": 0,
            }
            await tx.execute(sa.insert(t.outbox).values(values))
        values = {c.name: getattr(job, c.name, None) for c in t.jobs.columns if c.name != "seq"}
        values |= {"id": "single", "run_id": "r1", "status": JobStatus.QUEUED.value}
        await tx.execute(sa.insert(t.jobs).values(values))
    outbox = await raw(persistence, t.outbox, ("id", "run_id"))
    assert outbox[: len(events)] == outbox[len(events) :]
    jobs = await raw(persistence, t.jobs, ("id", "seq"))
    assert jobs[0] == jobs[1]


async def write(persistence: SqlPersistence, stage: StageRun, *, bulk: bool) -> None:
    async with persistence.transaction() as tx:
        if bulk:
            await tx.stages.update_many([stage])
        else:
            await tx.stages.update(stage)


async def test_a_nul_character_fails_the_write_as_before(persistence: SqlPersistence) -> None:
    """PostgreSQL text and JSONB cannot hold U+0000: the per-row statement and the
    set-oriented one both fail with a ``StorageError`` (and write nothing)."""
    async with persistence.transaction() as tx:
        await tx.runs.insert(Run(id="r1", workflow_id="wf", created_at=T0, updated_at=T0))
        await tx.stages.insert_many(
            [StageRun(workflow_run_id="r1", stage_id="s", execution_group=0)]
        )
    async with persistence.transaction() as tx:
        stage = await tx.stages.get("r1", "s")
    assert stage is not None
    for change in ({"error": "a\x00b"}, {"output": {"k": "a\x00b"}}):
        for bulk in (False, True):
            with pytest.raises(StorageError):
                await write(persistence, evolve(stage, change), bulk=bulk)
    async with persistence.transaction() as tx:
        assert await tx.stages.get("r1", "s") == stage


async def test_every_connection_plans_for_its_parameters_in_utc(
    postgres_url: str,
) -> None:
    """A generic plan made while a table was tiny would keep scanning it whole once it
    has grown; the engine's connections always plan for the actual parameters, and run
    in UTC. Options the caller passes are kept beside them."""
    from treadle.adapters.sql import create_engine

    for extra in ({}, {"connect_args": {"options": "-c application_name=bench"}}):
        engine = create_engine(postgres_url, **extra)
        try:
            async with engine.connect() as conn:
                mode = (await conn.execute(sa.text("SHOW plan_cache_mode"))).scalar_one()
                name = (await conn.execute(sa.text("SHOW application_name"))).scalar_one()
                zone = (await conn.execute(sa.text("SHOW TimeZone"))).scalar_one()
                now = (await conn.execute(sa.text("SELECT now()"))).scalar_one()
        finally:
            await engine.dispose()
        assert mode == "force_custom_plan"
        assert zone == "UTC"
        assert now.tzinfo is UTC  # read back without any conversion
        if extra:
            assert name == "bench"
