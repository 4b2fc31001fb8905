"""A code workflow woken by its timer runs on the worker that fired it, without a dequeue
(``stage.pollSuspended`` with ``worker_id`` and ``chain``): the firing commit fires the
timer, creates the activation's job leased to that worker and starts the stage
(RUNNING, ``stage:started`` after ``timer:fired``), as a chained stage's commit does; the
worker executes the job from the hand-off (``deps.chains``). A worker that dies after
that commit leaves a lease the reaper releases, and another worker resumes the run. On
memory, a SQLite file and PostgreSQL, on a fake clock."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from treadle import Engine, WorkflowContext, workflow
from treadle.kernel import commands as c
from treadle.kernel.model import JobStatus, RunStatus, StageStatus
from treadle.runtime.jobs import execute_job
from treadle.testing import FakeClock


class N(BaseModel):
    n: int


@workflow(id="sleeper", input=N, output=N)
async def sleeper(ctx: WorkflowContext, req: N) -> N:
    await ctx.sleep(timedelta(seconds=30))
    return N(n=req.n + 1)


WORKFLOWS = [sleeper]


async def _sleeping(engine: Engine, clock: FakeClock) -> str:
    """A run whose body went to sleep (its first activation executed by worker w0), with
    the clock moved past its timer."""
    created = await engine.kernel.dispatch(
        c.RunCreate(workflow_id="sleeper", input={"n": 1}, claim_for="w0")
    )
    assert created.chained_job is not None
    await execute_job(engine.kernel, created.chained_job, worker_id="w0")
    run = await engine.get_run(created.workflow_run_id)
    assert run.status is RunStatus.SUSPENDED
    clock.advance(31)
    return created.workflow_run_id


async def _dequeue(engine: Engine, worker: str) -> list[Any]:
    return await engine.kernel.deps.job_transport.dequeue(worker, engine.kernel.deps.clock.now())


async def _job(engine: Engine, job_id: str) -> Any:
    async with engine.kernel.deps.persistence.transaction() as tx:
        return await engine.kernel.deps.job_transport.get(tx, job_id)


async def test_a_fired_timer_leases_the_activation_to_the_firing_worker(
    engine: Engine, clock: FakeClock
) -> None:
    run_id = await _sleeping(engine, clock)
    polled = await engine.kernel.dispatch(c.StagePollSuspended(worker_id="w1", chain=1))
    assert polled.resumed_workflow_run_ids == [run_id]
    (job,) = polled.chained_jobs
    assert (job.workflow_run_id, job.status, job.worker_id, job.attempts) == (
        run_id,
        JobStatus.LEASED,
        "w1",
        1,
    )
    assert (await _job(engine, job.id)).status is JobStatus.LEASED
    assert job.id in engine.kernel.deps.chains
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.RUNNING
    (stage,) = run.stages
    assert (stage.status, stage.job_id) == (StageStatus.RUNNING, job.id)
    types = [e.type for e in await engine.kernel.reads.events(run_id)]
    assert types[-2:] == ["timer:fired", "stage:started"]
    assert await _dequeue(engine, "w2") == []  # never queued for another worker
    result = await engine.kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))
    assert (result.outcome, result.ghost) == ("completed", False)
    assert job.id not in engine.kernel.deps.chains
    run = await engine.get_run(run_id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 2})
    started = [e for e in await engine.kernel.reads.events(run_id) if e.type == "stage:started"]
    assert len(started) == 2  # the first activation, and the woken one: started once


async def test_without_chain_the_woken_activation_is_queued_for_any_worker(
    engine: Engine, clock: FakeClock
) -> None:
    run_id = await _sleeping(engine, clock)
    polled = await engine.kernel.dispatch(c.StagePollSuspended())
    assert polled.resumed_workflow_run_ids == [run_id]
    assert polled.chained_jobs == []
    (job,) = await _dequeue(engine, "w2")
    assert job.workflow_run_id == run_id
    await execute_job(engine.kernel, job, worker_id="w2")
    assert (await engine.get_run(run_id)).status is RunStatus.COMPLETED


async def test_a_stopped_worker_fires_without_leasing(engine: Engine, clock: FakeClock) -> None:
    run_id = await _sleeping(engine, clock)
    engine.kernel.deps.chains.stop("w1")
    polled = await engine.kernel.dispatch(c.StagePollSuspended(worker_id="w1", chain=4))
    assert polled.resumed_workflow_run_ids == [run_id]
    assert polled.chained_jobs == []
    assert len(await _dequeue(engine, "w2")) == 1


async def test_a_worker_killed_after_the_firing_commit_leaves_the_run_to_another(
    engine: Engine, clock: FakeClock
) -> None:
    """The firing worker dies after its commit, before executing the activation: its
    lease goes stale, the reaper releases it (the stage back to PENDING, the job queued
    again), and another worker resumes the body past the sleep."""
    run_id = await _sleeping(engine, clock)
    polled = await engine.kernel.dispatch(c.StagePollSuspended(worker_id="w1", chain=1))
    (job,) = polled.chained_jobs
    engine.kernel.deps.chains.clear()  # the process that held the hand-off is gone
    clock.advance(61)
    reaped = await engine.kernel.dispatch(c.LeaseReapStale(stale_threshold=60))
    assert reaped.released == 1
    (stage,) = (await engine.get_run(run_id)).stages
    assert stage.status is StageStatus.PENDING
    clock.advance(60)  # past the retry backoff
    (again,) = await _dequeue(engine, "w2")
    assert (again.id, again.attempts) == (job.id, 2)
    await execute_job(engine.kernel, again, worker_id="w2")
    run = await engine.get_run(run_id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 2})


async def test_a_worker_runs_the_woken_activation_without_a_dequeue(
    engine: Engine, clock: FakeClock
) -> None:
    """A ``Worker`` whose timer falls due fires it and executes the activation from the
    hand-off: the job loop never dequeues it (its only dequeue, at the start, found
    nothing), and the run completes with the job's first attempt."""
    run_id = await _sleeping(engine, clock)
    transport = engine.kernel.deps.job_transport
    dequeued: list[Any] = []
    dequeue = transport.dequeue

    async def counting(*args: Any, **kwargs: Any) -> list[Any]:
        jobs = await dequeue(*args, **kwargs)
        dequeued.extend(jobs)
        return jobs

    transport.dequeue = counting  # type: ignore[method-assign]
    try:
        async with engine.worker(orchestration_interval=0.05, job_poll_interval=0.05):
            for _ in range(400):
                if (await engine.get_run(run_id, with_stages=False)).status.terminal:
                    break
                await asyncio.sleep(0.05)
    finally:
        del transport.dequeue  # type: ignore[method-assign]
    run = await engine.get_run(run_id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 2})
    assert dequeued == []


async def test_the_firing_commit_is_two_transactions_with_one_write_of_the_wake(
    engine: Engine, clock: FakeClock
) -> None:
    """On PostgreSQL the poll that fires the timer and leases the activation is two
    transactions: its read, and the firing, whose wake-up writes (job, run, stage,
    events) are one ``write_set`` statement; no job is QUEUED, so no ``NOTIFY``; the
    timer is fired once."""
    if engine.backend is None or engine.backend.kind != "postgresql":
        return
    from psycopg.pq import TransactionStatus
    from sqlalchemy import event

    await _sleeping(engine, clock)
    sync_engine = engine.backend.persistence.engine.sync_engine  # type: ignore[attr-defined]
    statements: list[str] = []
    begins: list[bool] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        driver = conn.connection.driver_connection
        statements.append(" ".join(statement.split()).upper())
        begins.append(
            not driver.autocommit and driver.info.transaction_status == TransactionStatus.IDLE
        )

    event.listen(sync_engine, "before_cursor_execute", on_execute)
    try:
        polled = await engine.kernel.dispatch(c.StagePollSuspended(worker_id="w1", chain=1))
    finally:
        event.remove(sync_engine, "before_cursor_execute", on_execute)
    assert len(polled.chained_jobs) == 1
    assert sum(begins) == 2, statements
    assert [s for s in statements if s.startswith("WITH W_R AS (UPDATE")] != []
    assert len([s for s in statements if s.startswith("WITH W_R AS")]) == 1
    assert not [s for s in statements if "NOTIFY" in s and "WITH W_R" not in s], statements
    assert not [s for s in statements if s.startswith('INSERT INTO "JOBS"')], statements
    assert len([s for s in statements if s.startswith("UPDATE TIMERS")]) == 1, statements


async def test_a_woken_activation_with_no_free_slot_is_handed_back(
    engine: Engine, clock: FakeClock
) -> None:
    """The due step holds no slots while it runs (a batch check may be slow); an
    activation its firing leased to the worker that finds every slot taken by then is
    released for any worker (stage PENDING, job queued, the hand-off dropped), never
    run past ``concurrency``; another worker resumes the run."""
    from treadle.runtime.worker import Worker

    run_id = await _sleeping(engine, clock)
    worker = Worker(engine.kernel, concurrency=1, worker_id="w1")
    engine.kernel.deps.chains.serve("w1", worker.queues)
    polled = await engine.kernel.dispatch(c.StagePollSuspended(worker_id="w1", chain=1))
    (job,) = polled.chained_jobs
    worker._reserved = 1  # the one slot was taken while the step ran
    worker._take_woken(polled.chained_jobs)
    await asyncio.gather(*worker._in_flight)
    assert job.id not in engine.kernel.deps.chains
    (stage,) = (await engine.get_run(run_id)).stages
    assert stage.status is StageStatus.PENDING
    (again,) = await _dequeue(engine, "w2")
    assert again.id == job.id
    await execute_job(engine.kernel, again, worker_id="w2")
    assert (await engine.get_run(run_id)).status is RunStatus.COMPLETED
