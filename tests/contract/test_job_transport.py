"""JobTransport contract: the leased queue behaves the same on memory, SQLite and PostgreSQL.

``now`` is always passed in, so leases, backoff and staleness are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from treadle.kernel.errors import ConcurrencyError, DuplicateError, JobNotFoundError
from treadle.kernel.model import Job, JobStatus, Run

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_job(job_id: str, run_id: str = "r1", **fields: Any) -> Job:
    fields.setdefault("next_poll_at", T0)
    fields.setdefault("enqueued_at", T0)
    return Job(id=job_id, workflow_run_id=run_id, workflow_id="wf", stage_id=job_id, **fields)


class BoomError(Exception):
    """Raised inside a transaction to force its rollback."""


async def enqueue(backend: Any, *jobs: Job) -> None:
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.enqueue(tx, list(jobs))


async def get(backend: Any, job_id: str) -> Job | None:
    async with backend.persistence.transaction() as tx:
        job: Job | None = await backend.job_transport.get(tx, job_id)
    return job


async def dequeue_ids(
    backend: Any, now: datetime, *, limit: int = 10, worker: str = "w1"
) -> list[str]:
    return [j.id for j in await backend.job_transport.dequeue(worker, now, limit=limit)]


async def test_enqueued_job_reads_back_queued(backend: Any) -> None:
    """An enqueued job reads back with its fields, QUEUED, in exact UTC times."""
    job = make_job("j1", priority=7, max_attempts=5, next_poll_at=at(1.5), enqueued_at=at(0.25))
    await enqueue(backend, job)
    got = await get(backend, "j1")
    assert got is not None
    expected = job.model_dump(exclude={"sequence"})
    assert got.model_dump(exclude={"sequence"}) == expected
    assert got.status is JobStatus.QUEUED
    assert got.next_poll_at.utcoffset() == timedelta(0)
    assert await get(backend, "missing") is None


async def test_enqueue_joins_the_callers_transaction(backend: Any) -> None:
    """A job enqueued in a transaction that rolls back never existed: it cannot be leased."""
    p = backend.persistence

    async def enqueue_then_fail() -> None:
        async with p.transaction() as tx:
            await backend.job_transport.enqueue(tx, [make_job("j1")])
            await tx.runs.insert(Run(id="r1", workflow_id="wf", created_at=T0, updated_at=T0))
            assert await backend.job_transport.get(tx, "j1") is not None
            raise BoomError

    with pytest.raises(BoomError):
        await enqueue_then_fail()
    assert await get(backend, "j1") is None
    assert await backend.job_transport.dequeue("w1", at(60), limit=10) == []
    assert await backend.job_transport.next_due_at() is None
    async with p.transaction() as tx:
        assert await backend.job_transport.live_jobs(tx, "r1") == []
        assert await backend.job_transport.cancel_by_run(tx, "r1") == 0


async def test_a_job_enqueued_leased_stays_with_its_worker(backend: Any) -> None:
    """A job enqueued LEASED (a worker chaining into the next stage takes it itself) is
    held by that worker as if dequeued: nobody else can lease it, its holder extends the
    lease, and it goes stale when the heartbeats stop. Any other status enqueues QUEUED."""
    leased = make_job("j1", status=JobStatus.LEASED, worker_id="w1", attempts=1, heartbeat_at=T0)
    await enqueue(backend, leased, make_job("j2", status=JobStatus.COMPLETED))
    got = await get(backend, "j1")
    assert got is not None
    assert (got.status, got.worker_id, got.attempts, got.heartbeat_at) == (
        JobStatus.LEASED,
        "w1",
        1,
        T0,
    )
    other = await get(backend, "j2")
    assert other is not None
    assert other.status is JobStatus.QUEUED
    assert await dequeue_ids(backend, at(60), worker="w2") == ["j2"]
    assert not await backend.job_transport.extend_lease("j1", "w2", at(10))
    assert await backend.job_transport.extend_lease("j1", "w1", at(10))
    async with backend.persistence.transaction() as tx:
        assert await backend.job_transport.stale_leases(tx, at(10)) == []
        stale = await backend.job_transport.stale_leases(tx, at(70))
    assert [j.id for j in stale] == ["j1", "j2"]  # by last heartbeat: at(10), at(60)


async def test_duplicate_job_id_raises_duplicate_error(backend: Any) -> None:
    """A job id is unique, also within one enqueue call."""
    await enqueue(backend, make_job("j1"))
    with pytest.raises(DuplicateError, match="j1"):
        await enqueue(backend, make_job("j1"))
    with pytest.raises(DuplicateError, match="j2"):
        await enqueue(backend, make_job("j2"), make_job("j2"))
    assert await get(backend, "j2") is None


async def test_dequeue_leases_by_priority_then_fifo(backend: Any) -> None:
    """Higher priority first; equal priority in enqueue order, across enqueue calls."""
    await enqueue(backend, make_job("p1", priority=1), make_job("p9-a", priority=9))
    await enqueue(backend, make_job("p5", priority=5), make_job("p9-b", priority=9))
    await enqueue(backend, make_job("p5-b", priority=5))
    assert await dequeue_ids(backend, T0) == ["p9-a", "p9-b", "p5", "p5-b", "p1"]


async def test_dequeue_sets_the_lease(backend: Any) -> None:
    """A leased job is LEASED to the worker, heartbeat ``now``, attempts incremented."""
    await enqueue(backend, make_job("j1", attempts=2))
    (leased,) = await backend.job_transport.dequeue("w7", at(3))
    assert (leased.status, leased.worker_id, leased.heartbeat_at, leased.attempts) == (
        JobStatus.LEASED,
        "w7",
        at(3),
        3,
    )
    assert await get(backend, "j1") == leased


async def test_dequeue_waits_for_next_poll_at(backend: Any) -> None:
    """A job is not leased before its ``next_poll_at``, and is at that instant."""
    await enqueue(backend, make_job("later", next_poll_at=at(10)), make_job("now"))
    assert await dequeue_ids(backend, at(9.999999)) == ["now"]
    assert await dequeue_ids(backend, at(10)) == ["later"]


async def test_dequeue_honours_limit_and_never_leases_twice(backend: Any) -> None:
    """``limit`` caps a batch; a leased job is not handed to anyone else."""
    await enqueue(backend, *(make_job(f"j{i}") for i in range(5)))
    assert await backend.job_transport.dequeue("w1", T0, limit=0) == []
    first = await dequeue_ids(backend, T0, limit=2, worker="w1")
    second = await dequeue_ids(backend, at(100), limit=10, worker="w2")
    assert first == ["j0", "j1"]
    assert second == ["j2", "j3", "j4"]
    assert await dequeue_ids(backend, at(1000), worker="w3") == []


async def test_complete_finishes_a_job(backend: Any) -> None:
    """A completed job is no longer live and never leased again."""
    await enqueue(backend, make_job("j1"))
    await backend.job_transport.dequeue("w1", T0)
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.complete(tx, "j1")
    got = await get(backend, "j1")
    assert got is not None
    assert (got.status, got.worker_id) == (JobStatus.COMPLETED, None)
    assert await dequeue_ids(backend, at(100)) == []
    async with backend.persistence.transaction() as tx:
        assert await backend.job_transport.live_jobs(tx, "r1") == []


async def test_get_many_returns_the_found_jobs_by_id(backend: Any) -> None:
    """As ``get`` for each id in one call: missing ids absent, repeated ids harmless."""
    await enqueue(backend, make_job("j1", priority=3), make_job("j2", "r2"))
    async with backend.persistence.transaction() as tx:
        single = {job_id: await backend.job_transport.get(tx, job_id) for job_id in ("j1", "j2")}
        found = await backend.job_transport.get_many(tx, ["j2", "nope", "j1", "j2"])
        assert await backend.job_transport.get_many(tx, []) == {}
    assert found == single


async def test_complete_many_completes_each_job(backend: Any) -> None:
    """Every listed job is completed (a repeated id is harmless); others are untouched."""
    await enqueue(backend, make_job("j1"), make_job("j2"), make_job("j3"))
    await backend.job_transport.dequeue("w1", T0, limit=3)
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.complete_many(tx, ["j2", "j1", "j2"])
        await backend.job_transport.complete_many(tx, [])
    async with backend.persistence.transaction() as tx:
        jobs = await backend.job_transport.get_many(tx, ["j1", "j2", "j3"])
    assert [(j.status, j.worker_id) for j in (jobs["j1"], jobs["j2"])] == [
        (JobStatus.COMPLETED, None),
        (JobStatus.COMPLETED, None),
    ]
    assert (jobs["j3"].status, jobs["j3"].worker_id) == (JobStatus.LEASED, "w1")


async def test_complete_many_with_a_missing_job_completes_none(backend: Any) -> None:
    """A missing id is a ``JobNotFoundError`` naming every missing id, and none of the
    call's jobs is completed, even if the caller goes on and commits."""
    await enqueue(backend, make_job("j1"), make_job("j2"))
    await backend.job_transport.dequeue("w1", T0, limit=2)
    async with backend.persistence.transaction() as tx:
        with pytest.raises(JobNotFoundError, match=r"'gone'.*'lost'") as raised:
            await backend.job_transport.complete_many(tx, ["j1", "gone", "j2", "lost"])
        assert "'j1'" not in str(raised.value)
    with pytest.raises(JobNotFoundError, match="'gone'"):
        async with backend.persistence.transaction() as tx:
            await backend.job_transport.complete_many(tx, ["gone", "j2"])
    async with backend.persistence.transaction() as tx:
        jobs = await backend.job_transport.get_many(tx, ["j1", "j2"])
    assert {j.status for j in jobs.values()} == {JobStatus.LEASED}


async def test_complete_many_with_leases_completes_only_jobs_still_so_leased(
    backend: Any,
) -> None:
    """With ``leases``, a job requeued, re-leased (another attempt) or leased to another
    worker since is a ``ConcurrencyError`` naming it, and none of the call's jobs is
    completed; jobs still leased as given are."""
    await enqueue(backend, make_job("j1"), make_job("j2"), make_job("j3"))
    await backend.job_transport.dequeue("w1", T0, limit=3)  # attempts 1 each
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.complete_many(tx, ["j1"], leases={"j1": ("w1", 1)})
    for leases in ({"j2": ("w2", 1)}, {"j2": ("w1", 2)}):
        with pytest.raises(ConcurrencyError, match="'j2'"):
            async with backend.persistence.transaction() as tx:
                await backend.job_transport.complete_many(
                    tx, ["j3", "j2"], leases={"j3": ("w1", 1), **leases}
                )
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.requeue(tx, "j3", T0)
    with pytest.raises(ConcurrencyError, match="'j3'"):
        async with backend.persistence.transaction() as tx:
            await backend.job_transport.complete_many(tx, ["j3"], leases={"j3": ("w1", 1)})
    async with backend.persistence.transaction() as tx:
        jobs = await backend.job_transport.get_many(tx, ["j1", "j2", "j3"])
    assert [jobs[i].status for i in ("j1", "j2", "j3")] == [
        JobStatus.COMPLETED,
        JobStatus.LEASED,
        JobStatus.QUEUED,
    ]


async def test_suspend_parks_a_job(backend: Any) -> None:
    """A suspended job keeps its poll time, stays live, and is not dequeued even when due."""
    await enqueue(backend, make_job("j1"))
    await backend.job_transport.dequeue("w1", T0)
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.suspend(tx, "j1", at(30))
    got = await get(backend, "j1")
    assert got is not None
    assert (got.status, got.next_poll_at, got.worker_id) == (JobStatus.SUSPENDED, at(30), None)
    assert await dequeue_ids(backend, at(1000)) == []
    assert await backend.job_transport.next_due_at() is None
    async with backend.persistence.transaction() as tx:
        assert [j.id for j in await backend.job_transport.live_jobs(tx, "r1")] == ["j1"]


async def test_requeue_honours_the_backoff(backend: Any) -> None:
    """A requeued job drops its lease, records the error, and is leased again only from
    ``available_at``, with attempts counting on."""
    await enqueue(backend, make_job("j1"))
    await backend.job_transport.dequeue("w1", T0)
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.requeue(tx, "j1", at(8), error="flaky")
    got = await get(backend, "j1")
    assert got is not None
    assert (got.status, got.worker_id, got.heartbeat_at, got.last_error, got.attempts) == (
        JobStatus.QUEUED,
        None,
        None,
        "flaky",
        1,
    )
    assert got.next_poll_at == at(8)
    assert await backend.job_transport.next_due_at() == at(8)
    assert await dequeue_ids(backend, at(7.999999)) == []
    (again,) = await backend.job_transport.dequeue("w2", at(8))
    assert (again.attempts, again.worker_id) == (2, "w2")
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.requeue(tx, "j1", at(9))
    kept = await get(backend, "j1")
    assert kept is not None
    assert kept.last_error == "flaky"


async def test_requeue_can_refund_the_attempt(backend: Any) -> None:
    """``refund_attempt=True`` (a host giving the job back on purpose) puts ``attempts``
    back one, so the next lease is the same attempt again; a rolled-back refund leaves
    the lease untouched."""
    await enqueue(backend, make_job("j1"))
    await backend.job_transport.dequeue("w1", T0)
    await backend.job_transport.dequeue("w1", T0)  # nothing due: still attempt 1
    with contextlib.suppress(RuntimeError):
        async with backend.persistence.transaction() as tx:
            await backend.job_transport.requeue(tx, "j1", T0, refund_attempt=True)
            raise RuntimeError("roll back")
    held = await get(backend, "j1")
    assert held is not None
    assert (held.status, held.attempts) == (JobStatus.LEASED, 1)
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.requeue(tx, "j1", T0, error="stopping", refund_attempt=True)
    got = await get(backend, "j1")
    assert got is not None
    assert (got.status, got.attempts, got.worker_id) == (JobStatus.QUEUED, 0, None)
    (again,) = await backend.job_transport.dequeue("w2", T0)
    assert again.attempts == 1


async def test_requeued_job_keeps_its_priority_place(backend: Any) -> None:
    """After backoff a retried job competes by priority, and among equals the earlier due wins."""
    await enqueue(backend, make_job("retry", priority=5), make_job("low", priority=1))
    await backend.job_transport.dequeue("w1", T0, limit=1)
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.requeue(tx, "retry", at(5))
    await enqueue(backend, make_job("fresh", priority=5, next_poll_at=at(6)))
    assert await dequeue_ids(backend, at(10)) == ["retry", "fresh", "low"]


async def test_fail_is_terminal(backend: Any) -> None:
    """A failed job keeps its error and is never leased again."""
    await enqueue(backend, make_job("j1"))
    await backend.job_transport.dequeue("w1", T0)
    async with backend.persistence.transaction() as tx:
        await backend.job_transport.fail(tx, "j1", "gave up")
    got = await get(backend, "j1")
    assert got is not None
    assert (got.status, got.last_error, got.worker_id) == (JobStatus.FAILED, "gave up", None)
    assert await dequeue_ids(backend, at(1000)) == []


async def test_state_changes_of_a_missing_job_raise_job_not_found(backend: Any) -> None:
    """complete, suspend, requeue and fail of an unknown job id raise ``JobNotFoundError``."""
    transport = backend.job_transport
    calls = [
        lambda tx: transport.complete(tx, "nope"),
        lambda tx: transport.suspend(tx, "nope", T0),
        lambda tx: transport.requeue(tx, "nope", T0),
        lambda tx: transport.fail(tx, "nope", "x"),
    ]
    for call in calls:
        with pytest.raises(JobNotFoundError, match="nope"):
            async with backend.persistence.transaction() as tx:
                await call(tx)


async def test_cancel_by_run_cancels_only_that_runs_live_jobs(backend: Any) -> None:
    """QUEUED, LEASED and SUSPENDED jobs of the run are cancelled and counted; finished jobs
    and other runs' jobs are untouched."""
    await enqueue(
        backend,
        make_job("leased", priority=9),
        make_job("suspended", priority=8),
        make_job("done", priority=7),
        make_job("queued", priority=1),
        make_job("other", "r2"),
    )
    await backend.job_transport.dequeue("w1", T0, limit=3)
    t = backend.job_transport
    async with backend.persistence.transaction() as tx:
        await t.suspend(tx, "suspended", at(10))
        await t.complete(tx, "done")
        assert await t.cancel_by_run(tx, "r1") == 3
        assert await t.cancel_by_run(tx, "r1") == 0
    statuses = {}
    for job_id in ("leased", "suspended", "done", "queued", "other"):
        job = await get(backend, job_id)
        assert job is not None
        statuses[job_id] = job.status
    assert statuses == {
        "leased": JobStatus.CANCELLED,
        "suspended": JobStatus.CANCELLED,
        "done": JobStatus.COMPLETED,
        "queued": JobStatus.CANCELLED,
        "other": JobStatus.QUEUED,
    }
    assert await dequeue_ids(backend, at(100)) == ["other"]
    assert await t.extend_lease("leased", "w1", at(1)) is False


async def test_live_jobs_lists_queued_leased_and_suspended_by_id(backend: Any) -> None:
    """``live_jobs`` returns the run's unfinished jobs sorted by id."""
    await enqueue(
        backend,
        make_job("c-queued", priority=1),
        make_job("b-leased", priority=9),
        make_job("a-suspended", priority=8),
        make_job("d-failed", priority=7),
        make_job("x", "r2"),
    )
    await backend.job_transport.dequeue("w1", T0, limit=3)
    t = backend.job_transport
    async with backend.persistence.transaction() as tx:
        await t.suspend(tx, "a-suspended", at(10))
        await t.fail(tx, "d-failed", "x")
        live = await t.live_jobs(tx, "r1")
        assert await t.live_jobs(tx, "none") == []
    assert [(j.id, j.status) for j in live] == [
        ("a-suspended", JobStatus.SUSPENDED),
        ("b-leased", JobStatus.LEASED),
        ("c-queued", JobStatus.QUEUED),
    ]


async def test_extend_lease_only_for_the_holder(backend: Any) -> None:
    """Only the worker holding a live lease can extend it; the heartbeat moves to ``now``."""
    await enqueue(backend, make_job("j1"), make_job("queued", next_poll_at=at(100)))
    await backend.job_transport.dequeue("w1", T0)
    t = backend.job_transport
    assert await t.extend_lease("j1", "w2", at(5)) is False
    assert await t.extend_lease("j1", "w1", at(5)) is True
    assert await t.extend_lease("queued", "w1", at(5)) is False
    assert await t.extend_lease("missing", "w1", at(5)) is False
    got = await get(backend, "j1")
    assert got is not None
    assert (got.heartbeat_at, got.worker_id) == (at(5), "w1")
    async with backend.persistence.transaction() as tx:
        await t.complete(tx, "j1")
    assert await t.extend_lease("j1", "w1", at(6)) is False


async def test_stale_leases_are_those_without_a_recent_heartbeat(backend: Any) -> None:
    """LEASED jobs whose heartbeat is before the cutoff (exclusive) come back oldest first, up
    to ``limit``; a heartbeat makes a job fresh again."""
    t = backend.job_transport
    await enqueue(backend, make_job("a"), make_job("b"), make_job("c"), make_job("q", priority=0))
    await t.dequeue("w1", at(1), limit=1)  # a
    await t.dequeue("w2", at(0), limit=1)  # b
    await t.dequeue("w3", at(10), limit=1)  # c
    async with backend.persistence.transaction() as tx:
        stale = [j.id for j in await t.stale_leases(tx, at(10))]
        one = [j.id for j in await t.stale_leases(tx, at(10), limit=1)]
    assert stale == ["b", "a"]
    assert one == ["b"]
    assert await t.extend_lease("b", "w2", at(20)) is True
    async with backend.persistence.transaction() as tx:
        assert [j.id for j in await t.stale_leases(tx, at(15))] == ["a", "c"]


async def test_next_due_at_is_the_earliest_queued_job(backend: Any) -> None:
    """Hosts sleep until the earliest QUEUED job is due; leased jobs do not count."""
    t = backend.job_transport
    assert await t.next_due_at() is None
    await enqueue(
        backend,
        make_job("late", next_poll_at=at(30)),
        make_job("soon", next_poll_at=at(5.5), priority=9),
    )
    assert await t.next_due_at() == at(5.5)
    await t.dequeue("w1", at(6))
    due = await t.next_due_at()
    assert due == at(30)
    assert due is not None
    assert due.utcoffset() == timedelta(0)


async def test_rolled_back_state_changes_leave_the_lease_as_it_was(backend: Any) -> None:
    """complete, requeue, suspend, fail and cancel in a transaction that rolls back change
    nothing: the job is still leased to its worker and is not handed out again."""
    t = backend.job_transport
    await enqueue(backend, make_job("j1"))
    (leased,) = await t.dequeue("w1", T0)
    changes = [
        lambda tx: t.complete(tx, "j1"),
        lambda tx: t.requeue(tx, "j1", T0, error="x"),
        lambda tx: t.suspend(tx, "j1", T0),
        lambda tx: t.fail(tx, "j1", "x"),
        lambda tx: t.cancel_by_run(tx, "r1"),
    ]
    for change in changes:

        async def change_then_fail(change: Any = change) -> None:
            async with backend.persistence.transaction() as tx:
                await change(tx)
                raise BoomError

        with pytest.raises(BoomError):
            await change_then_fail()
        assert await get(backend, "j1") == leased
        assert await dequeue_ids(backend, at(100)) == []
    assert await t.extend_lease("j1", "w1", at(1)) is True
    async with backend.persistence.transaction() as tx:
        assert [j.id for j in await t.stale_leases(tx, at(2))] == ["j1"]
        assert [j.id for j in await t.live_jobs(tx, "r1")] == ["j1"]


async def test_concurrent_dequeues_share_jobs_without_overlap(backend: Any) -> None:
    """Workers dequeuing at the same moment each get different jobs, and together all of them."""
    await enqueue(backend, *(make_job(f"j{i:02}") for i in range(10)))
    t = backend.job_transport
    batches = await asyncio.gather(*(t.dequeue(f"w{n}", T0, limit=3) for n in range(4)))
    leased = [job.id for batch in batches for job in batch]
    assert sorted(leased) == [f"j{i:02}" for i in range(10)]
    for n, batch in enumerate(batches):
        assert all(job.worker_id == f"w{n}" for job in batch)


async def test_get_owned_agrees_with_the_three_reads(backend: Any) -> None:
    """Where the job transport offers ``get_owned`` (the SQL one), it returns what
    ``get_run``, ``get_stage`` and ``get`` return, payloads and missing rows included."""
    owned = getattr(backend.job_transport, "get_owned", None)
    if owned is None:  # an optional capability: the kernel makes the three reads instead
        assert backend.name == "memory"
        return
    from treadle.kernel.model import StageRun

    run = Run(
        id="r1",
        workflow_id="wf",
        input={"__treadle_value__": "shaped like a marker", "big": "x" * 5000},
        search_attributes={"k": "v"},
        created_at=T0,
        updated_at=T0,
    )
    stage = StageRun(workflow_run_id="r1", stage_id="workflow", execution_group=0)
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert(run)
        await tx.stages.insert_many([stage])
        stored = await tx.stages.get("r1", "workflow")
        await tx.stages.update(stored.model_copy(update={"output": {"n": [1, 2]}}))
    await enqueue(backend, make_job("j1"))
    await backend.job_transport.dequeue("w1", T0)
    async with backend.persistence.transaction() as tx:
        expected = (
            await tx.runs.get("r1"),
            await tx.stages.get("r1", "workflow"),
            await backend.job_transport.get(tx, "j1"),
        )
        assert await owned(tx, "j1", "r1", "workflow") == expected
        assert await owned(tx, "j1", "r1", "other") == (expected[0], None, expected[2])
        assert await owned(tx, "gone", "r1", "workflow") == (*expected[:2], None)
        assert await owned(tx, "j1", "gone", "workflow") == (None, None, expected[2])


async def test_a_job_keeps_its_queue_and_dequeue_takes_only_the_queues_named(
    backend: Any,
) -> None:
    """Named queues: a job reads back on its queue; ``dequeue(queues=[...])`` leases only
    jobs of those queues, in the usual priority-then-FIFO order, and leaves the others
    queued for their own workers; ``queues=None`` takes any."""
    await enqueue(
        backend,
        make_job("cpu-1"),
        make_job("gpu-1", queue="gpu"),
        make_job("gpu-2", queue="gpu", priority=9),
        make_job("io-1", queue="io"),
    )
    got = await get(backend, "gpu-1")
    assert got is not None
    assert got.queue == "gpu"
    default = await get(backend, "cpu-1")
    assert default is not None
    assert default.queue == "default"

    leased = await backend.job_transport.dequeue("w-gpu", at(1), limit=10, queues=["gpu"])
    assert [j.id for j in leased] == ["gpu-2", "gpu-1"]
    assert {j.queue for j in leased} == {"gpu"}
    assert await backend.job_transport.dequeue("w-gpu", at(1), limit=10, queues=["gpu"]) == []
    several = await backend.job_transport.dequeue("w-2", at(1), limit=10, queues=["io", "default"])
    assert [j.id for j in several] == ["cpu-1", "io-1"]  # FIFO across both queues
    await enqueue(backend, make_job("late", queue="other"))
    assert await dequeue_ids(backend, at(1)) == ["late"]  # no queues named: any queue


async def test_dequeue_by_stage_ids_leases_only_those_stages(backend: Any) -> None:
    """With ``stage_ids`` a dequeue leases only jobs of those stages (a remote worker
    serving some stages of a queue); with ``queues`` too, both must match."""
    await enqueue(
        backend,
        make_job("a", queue="remote"),
        make_job("b", queue="remote"),
        make_job("c", queue="default"),
    )
    transport = backend.job_transport
    got = await transport.dequeue("w1", at(1), limit=10, queues=["remote"], stage_ids=["b", "c"])
    assert [j.id for j in got] == ["b"]
    assert [j.id for j in await transport.dequeue("w1", at(1), limit=10, stage_ids=["c"])] == ["c"]
    assert await transport.dequeue("w1", at(1), limit=10, stage_ids=[]) == []
    assert [j.id for j in await transport.dequeue("w1", at(1), limit=10)] == ["a"]
