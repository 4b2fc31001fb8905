"""The set-oriented writes keep every value exactly, whatever the number of rows.

On PostgreSQL ``update_stages``, ``update_runs``, ``append_events``, ``enqueue`` and
``put_idempotency_many`` send all their rows as one JSON parameter (adapters/sql/
pg_bulk.py), so what a row can carry is re-encoded on the way: timestamps with
microseconds and any offset, durations, JSON edge values and NULLs. These tests
write such rows, many at once, and read them back on every backend.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from treadle.kernel.errors import ConcurrencyError
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
MANY = 500

EDGE_JSON: list[Any] = [
    None,
    {"nested": {"deeper": [1, [2, {"x": None}]], "empty": {}, "list": []}},
    "unicode: café ☃ 𝄞 «ü» 日本",
    'quotes " and \\ backslash \n newline \t tab \u007f',
    2**70,
    -(2**63),
    0.1,
    1.5e-7,
    123456780000000.0,
    -2.5e-300,
    123456789.123456789,
    True,
    False,
    "",
    [None, None],
    {"": "empty key", "k": "null"},
    "null",
]
"""Values a JSON column must store and give back as they are."""

MOMENTS: list[datetime] = [
    T0,
    datetime(2026, 3, 4, 10, 36, 7, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(1999, 12, 31, 23, 59, 59, 1, tzinfo=timezone(timedelta(hours=-8))),
    datetime(2026, 7, 1, tzinfo=UTC),
]

DURATIONS: list[timedelta | None] = [
    timedelta(microseconds=1),
    timedelta(days=3, hours=4, microseconds=7),
    timedelta(0),
    None,
    timedelta(days=-1, seconds=5),
]


def as_utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def stored_stage(stage: StageRun) -> StageRun:
    """``stage`` as a store gives it back: its timestamps in UTC."""
    fields = ("started_at", "completed_at", "next_poll_at", "suspend_deadline")
    return evolve(stage, {name: as_utc(getattr(stage, name)) for name in fields})


def edge_stage(run_id: str, i: int) -> dict[str, Any]:
    """Every column of a stage set from the edge values (and NULLs), varied by ``i``."""
    n = len(EDGE_JSON)
    return {
        "status": list(StageStatus)[i % len(StageStatus)],
        "attempt": i,
        "output": EDGE_JSON[i % n],
        "error": None if i % 2 else f"boom {i} ünïcode",
        "retryable": [None, True, False][i % 3],
        "started_at": MOMENTS[i % len(MOMENTS)],
        "completed_at": None if i % 4 == 0 else MOMENTS[(i + 1) % len(MOMENTS)],
        "suspended_state": EDGE_JSON[(i + 3) % n],
        "next_poll_at": None if i % 3 == 0 else MOMENTS[(i + 2) % len(MOMENTS)],
        "poll_interval": DURATIONS[i % len(DURATIONS)],
        "suspend_deadline": MOMENTS[(i + 3) % len(MOMENTS)] if i % 5 else None,
        "resume_state": EDGE_JSON[(i + 7) % n],
        "job_id": None if i % 2 else f"job-{run_id}",
    }


async def seed_runs(backend: Any, count: int) -> list[Run]:
    runs = [
        Run(id=f"r{i:04}", workflow_id="wf", created_at=T0, updated_at=T0) for i in range(count)
    ]
    async with backend.persistence.transaction() as tx:
        for run in runs:
            await tx.runs.insert(run)
        await tx.stages.insert_many(
            [StageRun(workflow_run_id=run.id, stage_id="s", execution_group=0) for run in runs]
        )
    return runs


async def test_update_stages_of_many_rows_keeps_every_value(backend: Any) -> None:
    runs = await seed_runs(backend, MANY)
    async with backend.persistence.transaction() as tx:
        stages = await tx.stages.for_runs([run.id for run in runs])
        changed = [evolve(stages[run.id][0], edge_stage(run.id, i)) for i, run in enumerate(runs)]
        new = await tx.stages.update_many(changed[::-1])  # not in key order
    assert new == [evolve(s, {"version": 1}) for s in changed[::-1]]
    async with backend.persistence.transaction() as tx:
        got = await tx.stages.for_runs([run.id for run in runs])
    assert [got[run.id] for run in runs] == [[stored_stage(s)] for s in new[::-1]]


async def test_update_stages_of_many_rows_with_one_stale_names_it_and_writes_none(
    backend: Any,
) -> None:
    runs = await seed_runs(backend, MANY)
    async with backend.persistence.transaction() as tx:
        stages = [group[0] for group in (await tx.stages.for_runs([r.id for r in runs])).values()]
        await tx.stages.update(evolve(stages[137], {"attempt": 9}))
    changed = [evolve(s, edge_stage(s.workflow_run_id, i + 1)) for i, s in enumerate(stages)]
    with pytest.raises(ConcurrencyError, match="'r0137'") as raised:
        async with backend.persistence.transaction() as tx:
            await tx.stages.update_many(changed)
    assert "'r0136'" not in str(raised.value)
    async with backend.persistence.transaction() as tx:
        after = await tx.stages.for_runs([r.id for r in runs])
    assert [group[0].version for group in after.values()].count(0) == MANY - 1


async def test_update_runs_of_many_rows_keeps_every_value(backend: Any) -> None:
    runs = await seed_runs(backend, MANY)
    n = len(EDGE_JSON)
    changed = [
        evolve(
            run,
            {
                "status": list(RunStatus)[i % len(RunStatus)],
                "input": EDGE_JSON[i % n],
                "output": EDGE_JSON[(i + 5) % n],
                "config": {"c": EDGE_JSON[(i + 1) % n]},
                "search_attributes": {"a": EDGE_JSON[(i + 2) % n], "i": i},
                "error": None if i % 2 else "ërror",
                "priority": i % 10,
                "idempotency_key": None if i % 3 else f"key-{i}",
                "parent_run_id": None if i % 4 else "parent",
                "started_at": MOMENTS[i % len(MOMENTS)],
                "completed_at": None if i % 2 else MOMENTS[(i + 1) % len(MOMENTS)],
                "updated_at": MOMENTS[(i + 2) % len(MOMENTS)],
                "worker_id": None if i % 2 else "w-1",
                "current_group": i,
            },
        )
        for i, run in enumerate(runs)
    ]
    async with backend.persistence.transaction() as tx:
        new = await tx.runs.update_many(changed)
    assert [r.version for r in new] == [1] * MANY
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get_many([run.id for run in runs])
    times = ("created_at", "started_at", "completed_at", "updated_at")
    expected = [evolve(r, {k: as_utc(getattr(r, k)) for k in times}) for r in new]
    assert [got[run.id] for run in runs] == expected


async def test_append_events_of_many_rows_numbers_and_keeps_them(backend: Any) -> None:
    n = len(EDGE_JSON)
    events = [
        StageCompleted(
            workflow_run_id=f"r{i % 7}",
            stage_id=f"s{i}",
            attempt=i,
            output=EDGE_JSON[i % n],
            duration=DURATIONS[i % len(DURATIONS)],
            timestamp=MOMENTS[i % len(MOMENTS)],
        )
        for i in range(MANY)
    ]
    async with backend.persistence.transaction() as tx:
        stored = await tx.outbox.append(events)
    async with backend.persistence.transaction() as tx:
        by_run = {f"r{k}": await tx.outbox.events_for_run(f"r{k}") for k in range(7)}
        pending = await tx.outbox.unpublished(limit=MANY + 1)
    for run_id, got in by_run.items():
        assert [e.sequence for e in got] == list(range(1, len(got) + 1))
        assert got == [e for e in stored if e.workflow_run_id == run_id]
    assert [record.event for record in pending] == stored  # outbox ids in append order


async def test_enqueue_of_many_jobs_keeps_every_value_and_their_order(backend: Any) -> None:
    jobs = [
        Job(
            id=f"j{i:04}-ü",
            workflow_run_id=f"r{i % 3}",
            workflow_id="wf",
            stage_id=f"s{i}",
            priority=5,
            attempts=i % 4,
            max_attempts=3 + i % 2,
            next_poll_at=MOMENTS[i % len(MOMENTS)],
            enqueued_at=MOMENTS[(i + 1) % len(MOMENTS)],
            last_error=None if i % 2 else f"error {i}",
        )
        for i in range(MANY)
    ]
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.enqueue(tx, jobs[::-1])
    async with backend.persistence.transaction() as tx:
        got = await backend.job_transport.get_many(tx, [job.id for job in jobs])
    times = ("next_poll_at", "enqueued_at")
    for job in jobs:
        stored = got[job.id]
        assert stored.status is JobStatus.QUEUED
        expected = evolve(job, {k: as_utc(getattr(job, k)) for k in times})
        assert evolve(stored, {"sequence": job.sequence}) == expected
    # Enqueued in reverse: the FIFO tie-break (sequence) follows the order given.
    order = sorted(got.values(), key=lambda job: job.sequence)
    assert [job.id for job in order] == [job.id for job in jobs[::-1]]


async def test_put_idempotency_many_of_many_records_keeps_every_value(backend: Any) -> None:
    n = len(EDGE_JSON)
    records = [
        IdempotencyRecord(
            key=f"k{i:04}-é",
            command_type="job.execute" if i % 2 else "run.create",
            state=list(IdempotencyState)[i % len(IdempotencyState)],
            result=EDGE_JSON[i % n],
            started_at=MOMENTS[i % len(MOMENTS)],
        )
        for i in range(MANY)
    ]
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put_many(records[::-1])
    async with backend.persistence.transaction() as tx:
        got = [await tx.idempotency.get(r.key, r.command_type) for r in records]
    assert got == [r.model_copy(update={"started_at": as_utc(r.started_at)}) for r in records]


def edge_run(i: int) -> Run:
    """A new run with every column set from the edge values (and NULLs), varied by ``i``."""
    n = len(EDGE_JSON)
    return Run(
        id=f"r{i:04}-ü",
        workflow_id=f"wf-{i % 3}",
        workflow_version=f"v{i % 2}",
        input=EDGE_JSON[i % n],
        config={"c": EDGE_JSON[(i + 1) % n]},
        priority=i % 10,
        idempotency_key=None if i % 3 == 0 else f"key-{i}-é",
        parent_run_id=None if i % 4 else "parent",
        search_attributes={"a": EDGE_JSON[(i + 2) % n], "i": i},
        created_at=MOMENTS[i % len(MOMENTS)],
        updated_at=MOMENTS[(i + 1) % len(MOMENTS)],
    )


async def test_insert_runs_of_many_rows_keeps_every_value(backend: Any) -> None:
    runs = [edge_run(i) for i in range(MANY)]
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert_many(runs)
    times = ("created_at", "started_at", "completed_at", "updated_at")
    expected = [evolve(r, {k: as_utc(getattr(r, k)) for k in times}) for r in runs]
    keyed = [r for r in expected if r.idempotency_key is not None]
    async with backend.persistence.transaction() as tx:
        got = await tx.runs.get_many([run.id for run in runs])
        by_key = await tx.runs.find_by_keys([(r.workflow_id, r.idempotency_key) for r in keyed])
    assert [got[run.id] for run in runs] == expected
    assert by_key == {(r.workflow_id, r.idempotency_key): r for r in keyed}


@pytest.mark.parametrize("fresh", [True, False], ids=["runs-of-this-transaction", "stored-runs"])
async def test_insert_stages_of_many_rows_keeps_every_value(backend: Any, fresh: bool) -> None:
    """Inserted stages keep every value and their order, whether their runs were inserted
    by the same transaction (no lookup of existing stages) or before."""
    runs = [Run(id=f"r{i:03}", workflow_id="wf", created_at=T0, updated_at=T0) for i in range(50)]
    stages = [
        StageRun(
            workflow_run_id=runs[i % 50].id,
            stage_id=f"s{i:04}",
            execution_group=i // 50,
            check_failures=i % 3,
            version=i % 5,
            **edge_stage(runs[i % 50].id, i),
        )
        for i in range(MANY)
    ]
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert_many(runs)
        if fresh:
            await tx.stages.insert_many(stages)
    if not fresh:
        async with backend.persistence.transaction() as tx:
            await tx.stages.insert_many(stages)
    async with backend.persistence.transaction() as tx:
        got = await tx.stages.for_runs([run.id for run in runs])
    for run in runs:
        assert got[run.id] == [stored_stage(s) for s in stages if s.workflow_run_id == run.id]
