"""In-memory fakes: the transaction really rolls back, and stored events come back as
typed models."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from treadle.kernel.errors import ConcurrencyError, DuplicateError, TreadleError
from treadle.kernel.events import (
    EventBase,
    StageCompleted,
    WorkflowCreated,
    dump_event,
    parse_event,
)
from treadle.kernel.model import (
    Annotation,
    IdempotencyRecord,
    IdempotencyState,
    Job,
    JobStatus,
    LogRecord,
    Run,
    StageRun,
    evolve,
)
from treadle.testing import InMemoryJobTransport, InMemoryPersistence

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _run(run_id: str = "r1", **kw: object) -> Run:
    return Run(id=run_id, workflow_id="wf", created_at=NOW, updated_at=NOW, **kw)  # type: ignore[arg-type]


def _job(job_id: str, run_id: str = "r1") -> Job:
    return Job(
        id=job_id,
        workflow_run_id=run_id,
        workflow_id="wf",
        stage_id="s",
        next_poll_at=NOW,
        enqueued_at=NOW,
    )


class BoomError(Exception):
    pass


async def _fail_after(p: InMemoryPersistence, writes: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``writes`` in a transaction that then raises, so it must roll back."""
    async with p.transaction() as tx:
        await writes(tx)
        raise BoomError


async def test_transaction_rolls_back_every_write() -> None:
    """An exception inside transaction() undoes runs, stages, events, idempotency,
    logs and jobs written in it, and nothing half-written is visible."""
    p = InMemoryPersistence()
    jobs = InMemoryJobTransport(p)
    async with p.transaction() as tx:
        await tx.runs.insert(_run())
        await tx.stages.insert_many(
            [StageRun(workflow_run_id="r1", stage_id="s", execution_group=0)]
        )

    async def writes(tx: Any) -> None:
        run = await tx.runs.get("r1")
        assert run is not None
        await tx.runs.update(evolve(run, {"priority": 9}))
        stage = await tx.stages.get("r1", "s")
        assert stage is not None
        await tx.stages.update(evolve(stage, {"attempt": 3}))
        await tx.runs.insert(_run("r2", idempotency_key="k"))
        await tx.outbox.append(
            [WorkflowCreated(workflow_run_id="r1", timestamp=NOW, workflow_id="wf", priority=5)]
        )
        await tx.idempotency.put(
            IdempotencyRecord(
                key="k",
                command_type="run.create",
                state=IdempotencyState.IN_PROGRESS,
                started_at=NOW,
            )
        )
        await jobs.enqueue(tx, [_job("j1")])
        await tx.logs.append(
            [
                LogRecord(
                    workflow_run_id="r1", stage_id="s", level="info", message="m", timestamp=NOW
                )
            ]
        )
        await tx.annotations.insert_many(
            [Annotation(id="a1", workflow_run_id="r1", attributes={"k": 1}, created_at=NOW)]
        )

    with pytest.raises(BoomError):
        await _fail_after(p, writes)
    assert p.rollbacks == 1
    assert set(p.runs) == {"r1"}
    assert p.runs["r1"].priority == 5
    assert p.runs["r1"].version == 0
    assert p.stages["r1"]["s"].attempt == 0
    assert p.run_keys == {}
    assert p.outbox == {}
    assert p.unpublished == {}
    assert p.events_by_run.get("r1", []) == []
    assert p.event_seq["r1"] == 0
    assert p.idempotency == {}
    assert p.logs.get("r1", []) == []
    assert p.annotations.get("r1", []) == []
    assert jobs.jobs == {}
    assert await jobs.dequeue("w", NOW) == []
    async with p.transaction() as tx:
        assert await jobs.live_jobs(tx, "r1") == []
        assert await jobs.cancel_by_run(tx, "r1") == 0


async def test_rolled_back_publication_keeps_the_outbox_in_order() -> None:
    """A rolled-back ``mark_published`` puts its rows back where they were: the next
    flush still reads each run's events oldest first. A rolled-back append of events of
    two runs leaves both runs' sequences as they were."""
    p = InMemoryPersistence()
    async with p.transaction() as tx:
        await tx.runs.insert(_run())
        await tx.runs.insert(_run("r2"))
        await tx.outbox.append(
            [
                WorkflowCreated(workflow_run_id=run_id, timestamp=NOW, workflow_id="wf", priority=5)
                for run_id in ("r1", "r1", "r2", "r1")
            ]
        )
        before = [
            (r.id, r.event.workflow_run_id, r.event.sequence)
            for r in await tx.outbox.unpublished(10)
        ]
    assert [seq for _, _, seq in before] == [1, 2, 1, 3]

    async def publish_some(tx: Any) -> None:
        await tx.outbox.mark_published([before[0][0], before[1][0], before[3][0]])
        assert [r.id for r in await tx.outbox.unpublished(10)] == [before[2][0]]

    with pytest.raises(BoomError):
        await _fail_after(p, publish_some)
    async with p.transaction() as tx:
        again = [
            (r.id, r.event.workflow_run_id, r.event.sequence)
            for r in await tx.outbox.unpublished(10)
        ]
    assert again == before

    async def append_more(tx: Any) -> None:
        stored = await tx.outbox.append(
            [
                WorkflowCreated(workflow_run_id=run_id, timestamp=NOW, workflow_id="wf", priority=5)
                for run_id in ("r2", "r1", "r2")
            ]
        )
        assert [e.sequence for e in stored] == [2, 4, 3]

    with pytest.raises(BoomError):
        await _fail_after(p, append_more)
    async with p.transaction() as tx:
        assert [
            (r.id, r.event.workflow_run_id, r.event.sequence)
            for r in await tx.outbox.unpublished(10)
        ] == before
        assert [e.sequence for e in await tx.outbox.events_for_run("r1")] == [1, 2, 3]
        assert [e.sequence for e in await tx.outbox.events_for_run("r2")] == [1]
        stored = await tx.outbox.append(
            [WorkflowCreated(workflow_run_id="r2", timestamp=NOW, workflow_id="wf", priority=5)]
        )
    assert [e.sequence for e in stored] == [2]


async def test_rolled_back_lease_change_is_still_reapable() -> None:
    """A rolled-back release of a leased job leaves it leased and visible to reaping."""
    p = InMemoryPersistence()
    jobs = InMemoryJobTransport(p)
    async with p.transaction() as tx:
        await jobs.enqueue(tx, [_job("j1")])
    [leased] = await jobs.dequeue("w", NOW)

    async def release(tx: Any) -> None:
        await jobs.complete(tx, leased.id)

    with pytest.raises(BoomError):
        await _fail_after(p, release)
    assert jobs.jobs["j1"].status is JobStatus.LEASED
    async with p.transaction() as tx:
        stale = await jobs.stale_leases(tx, NOW + timedelta(seconds=1))
    assert [j.id for j in stale] == ["j1"]


async def test_transaction_cannot_be_used_after_it_ends() -> None:
    """Writing through a finished transaction raises instead of silently committing."""
    p = InMemoryPersistence()
    async with p.transaction() as tx:
        pass
    with pytest.raises(TreadleError, match="after it ended"):
        await tx.runs.insert(_run())


async def test_duplicates_and_version_conflicts() -> None:
    """Duplicate ids and keys raise DuplicateError; a stale version raises ConcurrencyError."""
    p = InMemoryPersistence()
    async with p.transaction() as tx:
        await tx.runs.insert(_run(idempotency_key="k"))
        with pytest.raises(DuplicateError):
            await tx.runs.insert(_run())
        with pytest.raises(DuplicateError):
            await tx.runs.insert(_run("r9", idempotency_key="k"))
        run = await tx.runs.get("r1")
        assert run is not None
        await tx.runs.update(run)
        with pytest.raises(ConcurrencyError):
            await tx.runs.update(run)


async def test_events_read_back_are_typed_models() -> None:
    """Events read back from storage (and parsed from JSON) are the typed event models."""
    p = InMemoryPersistence()
    async with p.transaction() as tx:
        await tx.runs.insert(_run())
        await tx.outbox.append(
            [
                WorkflowCreated(workflow_run_id="r1", timestamp=NOW, workflow_id="wf", priority=5),
                StageCompleted(
                    workflow_run_id="r1",
                    timestamp=NOW,
                    stage_id="s",
                    attempt=1,
                    output={"x": 1},
                    duration=timedelta(seconds=2),
                ),
            ]
        )
    async with p.transaction() as tx:
        events = await tx.outbox.events_for_run("r1")
        after_first = await tx.outbox.events_for_run("r1", after_sequence=1)
        outbox = await tx.outbox.unpublished(10)
    assert [type(e) for e in events] == [WorkflowCreated, StageCompleted]
    assert [e.sequence for e in events] == [1, 2]
    assert after_first == events[1:]
    assert [type(r.event) for r in outbox] == [WorkflowCreated, StageCompleted]
    for event in events:
        again = parse_event(dump_event(event))
        assert type(again) is type(event)
        assert again == event
        assert parse_event(event.model_dump(mode="json")) == event
    completed = events[1]
    assert isinstance(completed, StageCompleted)
    assert isinstance(completed, EventBase)
    assert completed.duration == timedelta(seconds=2)
    assert completed.timestamp.tzinfo is not None
