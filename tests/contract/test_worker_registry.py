"""WorkerRegistry contract: liveness and queue depths read the same on memory, SQLite and
PostgreSQL (the same ``backend`` fixture as the other contract suites)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from treadle.kernel.model import Job, JobStatus, QueueDepth, WorkerInfo

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def registry(backend: Any) -> Any:
    if backend.name == "memory":
        from treadle.adapters.memory import InMemoryWorkerRegistry

        return InMemoryWorkerRegistry(backend.job_transport)
    from treadle.adapters.sql import SqlWorkerRegistry

    return SqlWorkerRegistry(backend.persistence)


def worker(worker_id: str, *queues: str, beat: float = 0) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        queues=queues,
        host="box",
        pid=42,
        started_at=T0,
        heartbeat_at=T0 + timedelta(seconds=beat),
    )


async def test_workers_beat_leave_and_age_out(backend: Any) -> None:
    """A beat inserts a worker, a later beat refreshes its heartbeat and queues, ``leave``
    forgets it, and ``prune`` drops the ones not seen since a time."""
    workers = registry(backend)
    await workers.beat(worker("a", "default"))
    await workers.beat(worker("b", "gpu", "default", beat=5))
    await workers.beat(worker("a", "default", "io", beat=10))
    listed = await workers.list_workers()
    assert [w.worker_id for w in listed] == ["a", "b"]  # most recent beat first
    assert listed[0] == worker("a", "default", "io", beat=10)
    assert listed[1].queues == ("gpu", "default")
    assert await workers.prune(T0 + timedelta(seconds=6)) == 1
    assert [w.worker_id for w in await workers.list_workers()] == ["a"]
    await workers.leave("a")
    await workers.leave("never-there")
    assert await workers.list_workers() == []


async def test_queue_depths_count_live_jobs_by_queue_and_state(backend: Any) -> None:
    """Due QUEUED jobs are ``queued`` (with the oldest due time), later ones
    ``scheduled``, LEASED ones ``leased``; finished jobs and empty queues are absent."""

    def job(job_id: str, queue: str, due: float, **fields: Any) -> Job:
        return Job(
            id=job_id,
            workflow_run_id="r1",
            workflow_id="wf",
            stage_id=job_id,
            queue=queue,
            next_poll_at=T0 + timedelta(seconds=due),
            enqueued_at=T0,
            **fields,
        )

    leased = {"status": JobStatus.LEASED, "worker_id": "w", "attempts": 1, "heartbeat_at": T0}
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.enqueue(
            tx,
            [
                job("g1", "gpu", 0),
                job("g2", "gpu", 3),
                job("g3", "gpu", 120),
                job("d1", "default", 0, **leased),
                job("x1", "done", 0),
            ],
        )
        await backend.job_transport.complete(tx, "x1")
    depths = await registry(backend).queue_depths(T0 + timedelta(seconds=10))
    assert depths == [
        QueueDepth(queue="default", leased=1),
        QueueDepth(queue="gpu", queued=2, scheduled=1, oldest_due_at=T0),
    ]
