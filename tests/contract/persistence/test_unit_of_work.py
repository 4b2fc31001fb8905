"""Persistence contract, the unit of work: a failed transaction rolls back every concern's
writes, and an ended transaction refuses use.
"""

from __future__ import annotations

from typing import Any

import pytest

from treadle.kernel.errors import (
    DuplicateError,
    TreadleError,
)
from treadle.kernel.model import (
    IdempotencyRecord,
    IdempotencyState,
    Job,
    LogRecord,
    RunStatus,
    StageStatus,
    evolve,
)
from treadle.tests.contract.persistence.helpers import (
    T0,
    BoomError,
    annotation,
    at,
    created,
    fail_after,
    make_run,
    make_stage,
    seed,
)


def make_job(job_id: str, run_id: str) -> Job:
    return Job(
        id=job_id,
        workflow_run_id=run_id,
        workflow_id="wf",
        stage_id="a",
        next_poll_at=T0,
        enqueued_at=T0,
    )


async def test_a_failed_transaction_leaves_nothing_behind(backend: Any) -> None:
    """An exception inside ``transaction()`` undoes every write: runs, stages, jobs, events,
    idempotency, logs, annotations, updates and deletes, and gives sequences back."""
    record = IdempotencyRecord(
        key="kept", command_type="run.create", state=IdempotencyState.COMPLETED, started_at=T0
    )
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert(make_run("r1"))
        await tx.stages.insert_many([make_stage("r1", "a")])
        await tx.outbox.append([created("r1")])
        await tx.idempotency.put(record)
    p = backend.persistence

    async def writes(tx: Any) -> None:
        run = await tx.runs.get("r1")
        stage = await tx.stages.get("r1", "a")
        assert run is not None
        assert stage is not None
        await tx.runs.update(evolve(run, {"status": RunStatus.RUNNING}))
        await tx.stages.update(evolve(stage, {"status": StageStatus.RUNNING}))
        await tx.runs.insert(make_run("r2", idempotency_key="new"))
        await tx.runs.insert_many([make_run("r3", idempotency_key="many"), make_run("r4")])
        await tx.stages.insert_many([make_stage("r2", "a"), make_stage("r2", "b", 1)])
        await tx.stages.insert_many([make_stage("r3", "a"), make_stage("r4", "a")])
        await backend.job_transport.enqueue(tx, [make_job("j2", "r2")])
        await tx.outbox.append([created("r1"), created("r2"), created("r3")])
        await tx.idempotency.put(
            IdempotencyRecord(
                key="new", command_type="run.create", state="IN_PROGRESS", started_at=T0
            )
        )
        await tx.idempotency.delete("kept", "run.create")
        await tx.logs.append(
            [
                LogRecord(
                    workflow_run_id="r2", stage_id=None, level="info", message="m", timestamp=T0
                )
            ]
        )
        await tx.annotations.insert_many([annotation("an", run_id="r2", idempotency_key="x")])
        # Everything is visible inside the transaction before it fails.
        assert await tx.runs.get("r2") is not None
        assert await backend.job_transport.get(tx, "j2") is not None

    with pytest.raises(BoomError):
        await fail_after(backend, writes)
    async with p.transaction() as tx:
        assert await tx.runs.get("r2") is None
        assert await tx.runs.find_by_key("wf", "new") is None
        assert await tx.stages.for_run("r2") == []
        assert await tx.runs.get_many(["r3", "r4"]) == {}
        assert await tx.runs.find_by_keys([("wf", "many")]) == {}
        assert await tx.stages.for_runs(["r3", "r4"]) == {"r3": [], "r4": []}
        assert await tx.outbox.events_for_run("r3") == []
        assert await backend.job_transport.get(tx, "j2") is None
        assert await backend.job_transport.live_jobs(tx, "r2") == []
        assert await tx.outbox.events_for_run("r2") == []
        assert [e.sequence for e in await tx.outbox.events_for_run("r1")] == [1]
        assert len(await tx.outbox.unpublished(10)) == 1
        assert await tx.idempotency.get("new", "run.create") is None
        assert await tx.idempotency.get("kept", "run.create") == record
        assert await tx.logs.for_run("r2") == []
        assert await tx.annotations.for_run("r2") == []
        run = await tx.runs.get("r1")
        stage = await tx.stages.get("r1", "a")
        assert run is not None
        assert (run.status, run.version) == (RunStatus.PENDING, 0)
        assert stage is not None
        assert (stage.status, stage.version) == (StageStatus.PENDING, 0)
        assert await tx.runs.claim_pending(10) == [run]
    assert await backend.job_transport.dequeue("w", at(1)) == []
    assert await backend.job_transport.next_due_at() is None
    async with p.transaction() as tx:
        # The rolled-back ids and keys are free again.
        await tx.runs.insert(make_run("r2", idempotency_key="new"))
        await tx.runs.insert_many([make_run("r3", idempotency_key="many"), make_run("r4")])
        await tx.stages.insert_many([make_stage("r2", "a")])
        await backend.job_transport.enqueue(tx, [make_job("j2", "r2")])
        assert [e.sequence for e in await tx.outbox.append([created("r2")])] == [1]


async def test_an_uncaught_duplicate_rolls_back_the_whole_transaction(backend: Any) -> None:
    """A domain error escaping the transaction undoes the writes made before it."""
    await seed(backend, make_run("r1"))

    async def writes(tx: Any) -> None:
        await tx.runs.insert(make_run("r2"))
        await tx.outbox.append([created("r2")])
        await tx.runs.insert(make_run("r1"))

    with pytest.raises(DuplicateError):
        async with backend.persistence.transaction() as tx:
            await writes(tx)
    async with backend.persistence.transaction() as tx:
        assert await tx.runs.get("r2") is None
        assert await tx.outbox.events_for_run("r2") == []


async def test_a_transaction_cannot_be_written_after_it_ended(backend: Any) -> None:
    """Writing through a finished transaction raises instead of silently auto-committing."""
    async with backend.persistence.transaction() as tx:
        pass
    with pytest.raises(TreadleError):
        await tx.runs.insert(make_run("late"))
    async with backend.persistence.transaction() as fresh:
        assert await fresh.runs.get("late") is None
