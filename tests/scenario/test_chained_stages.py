"""Chained stages (``job.execute`` with ``chain=True``): the commit of a stage's result
leases the run's next stage to the same worker and starts it, and every guarantee of the
dequeued path still holds for that job: lease, heartbeat, reaping after a crash, the
ghost check after a cancel, exactly one committed result. On memory, a SQLite file and
PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.model import Job, JobStatus, RunStatus, StageStatus
from treadle.runtime.jobs import execute_job, job_idempotency_key
from treadle.testing import FakeClock

CALLS: list[str] = []
HOLD: dict[str, asyncio.Event] = {}
ENTERED: dict[str, asyncio.Event] = {}


class Num(BaseModel):
    n: int


def _step(stage_id: str) -> Any:
    @define_stage(id=stage_id, input=Num, output=Num)
    async def step(ctx):  # type: ignore[no-untyped-def]
        CALLS.append(stage_id)
        if stage_id in ENTERED:
            ENTERED[stage_id].set()
        gate = HOLD.get(stage_id)
        if gate is not None:
            await gate.wait()
        return Num(n=ctx.input.n + 1)

    return step


class Pair(BaseModel):
    b: Num
    c: Num


@define_stage(id="d", input=Pair, output=Num)
async def join(ctx):  # type: ignore[no-untyped-def]
    CALLS.append("d")
    return Num(n=ctx.input.b.n + ctx.input.c.n)


SEQ = WorkflowBuilder("seq", input=Num).pipe(_step("a")).pipe(_step("b")).pipe(_step("c")).build()
FAN = (
    WorkflowBuilder("fan", input=Num)
    .pipe(_step("a"))
    .parallel([_step("b"), _step("c")])
    .pipe(join)
    .build()
)


WORKFLOWS = [SEQ, FAN]


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    HOLD.clear()
    ENTERED.clear()


# -- helpers ------------------------------------------------------------------------------
async def _first_job(engine: Engine, workflow_id: str = "seq") -> tuple[str, Job]:
    handle = await engine.start(workflow_id, {"n": 1})
    await engine.kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    assert engine.backend is not None
    (job,) = await engine.backend.job_transport.dequeue("w1", engine.kernel.deps.clock.now())
    return handle.run_id, job


async def _execute(
    engine: Engine, job: Job, *, worker: str = "w1", chain: bool = True, keyed: bool = True
) -> c.JobExecuteResult:
    return await engine.kernel.dispatch(
        c.JobExecute(
            job_id=job.id,
            worker_id=worker,
            idempotency_key=job_idempotency_key(job) if keyed else None,
            chain=chain,
        )
    )


async def _dequeue(engine: Engine, worker: str = "w2") -> list[Job]:
    assert engine.backend is not None
    return await engine.backend.job_transport.dequeue(
        worker, engine.kernel.deps.clock.now(), limit=10
    )


async def _job(engine: Engine, job_id: str) -> Job:
    async with engine.kernel.deps.persistence.transaction() as tx:
        job = await engine.kernel.deps.job_transport.get(tx, job_id)
    assert job is not None
    return job


async def _stages(engine: Engine, run_id: str) -> dict[str, Any]:
    run = await engine.get_run(run_id)
    return {s.stage_id: s for s in run.stages}


async def _events(engine: Engine, run_id: str) -> list[Any]:
    return await engine.kernel.reads.events(run_id)


# -- tests --------------------------------------------------------------------------------
async def test_a_chained_commit_starts_the_next_stage_for_the_same_worker(engine: Engine) -> None:
    """The result commit leases the next stage to the committing worker and starts it
    (RUNNING, ``stage:started`` right after ``stage:completed``); no other worker can take
    it, and the chain carries the run to completion with each stage run and committed once."""
    run_id, job = await _first_job(engine)
    first = await _execute(engine, job)
    chained = first.chained_job
    assert first.outcome == "completed"
    assert chained is not None
    assert (chained.stage_id, chained.status, chained.worker_id) == ("b", JobStatus.LEASED, "w1")
    assert chained.attempts == 1
    stored = await _job(engine, chained.id)
    assert (stored.status, stored.worker_id, stored.attempts) == (JobStatus.LEASED, "w1", 1)
    b = (await _stages(engine, run_id))["b"]
    assert (b.status, b.attempt, b.job_id) == (StageStatus.RUNNING, 1, chained.id)
    types = [(e.type, getattr(e, "stage_id", None)) for e in await _events(engine, run_id)]
    assert types[-2:] == [("stage:completed", "a"), ("stage:started", "b")]
    assert await _dequeue(engine) == []  # leased: nobody else can take it

    second = await _execute(engine, chained)
    assert second.outcome == "completed"
    assert second.chained_job is not None
    third = await _execute(engine, second.chained_job)
    assert third.outcome == "completed"
    assert third.chained_job is None  # the last stage
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"n": 4}
    assert CALLS == ["a", "b", "c"]
    assert {s.stage_id: s.attempt for s in run.stages} == {"a": 1, "b": 1, "c": 1}
    events = await _events(engine, run_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    started = [e.stage_id for e in events if e.type == "stage:started"]
    completed = [e.stage_id for e in events if e.type == "stage:completed"]
    assert started == completed == ["a", "b", "c"]
    assert events[-1].type == "workflow:completed"


async def test_without_chain_the_next_stage_is_queued_for_any_worker(engine: Engine) -> None:
    """``chain=False`` (the default) leaves the next stage QUEUED for whichever worker
    dequeues it, as before."""
    run_id, job = await _first_job(engine)
    result = await _execute(engine, job, chain=False)
    assert result.chained_job is None
    (queued,) = await _dequeue(engine)
    assert queued.stage_id == "b"
    assert queued.worker_id == "w2"
    assert (await _stages(engine, run_id))["b"].status is StageStatus.PENDING


async def test_a_parallel_group_chains_one_stage_and_queues_the_others(engine: Engine) -> None:
    """Fan-out: one stage of the next group is chained, its siblings are queued for any
    worker; the stage whose commit completes the group chains the join."""
    run_id, job = await _first_job(engine, "fan")
    chained = (await _execute(engine, job)).chained_job
    assert chained is not None
    assert chained.stage_id == "b"
    (sibling,) = await _dequeue(engine)
    assert sibling.stage_id == "c"
    assert (await _execute(engine, chained)).chained_job is None  # c is not done yet
    last = await _execute(engine, sibling, worker="w2")
    assert last.chained_job is not None
    assert last.chained_job.stage_id == "d"
    assert last.chained_job.worker_id == "w2"
    assert (await _execute(engine, last.chained_job, worker="w2")).chained_job is None
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"n": 6}


async def test_a_crash_after_the_chained_commit_leaves_the_job_to_the_reaper(
    engine: Engine, clock: FakeClock
) -> None:
    """A worker that dies right after the chained commit (no hand-off, no heartbeat)
    leaves a lease that expires: ``lease.reapStale`` requeues the job and resets the
    stage, another worker runs it as attempt 2, and the run completes."""
    run_id, job = await _first_job(engine)
    chained = (await _execute(engine, job)).chained_job
    assert chained is not None
    engine.kernel.deps.chains.clear()  # the process that held the hand-off is gone
    clock.advance(30)
    reaped = await engine.kernel.dispatch(c.LeaseReapStale(stale_threshold=60))
    assert reaped.released == 0  # heartbeat_at was set by the chained commit
    clock.advance(31)
    reaped = await engine.kernel.dispatch(c.LeaseReapStale(stale_threshold=60))
    assert reaped.released == 1
    b = (await _stages(engine, run_id))["b"]
    assert b.status is StageStatus.PENDING
    assert "lease expired" in (b.error or "")
    clock.advance(60)  # past the retry backoff
    (again,) = await _dequeue(engine)
    assert (again.id, again.attempts) == (chained.id, 2)
    result = await _execute(engine, again, worker="w2")
    assert result.outcome == "completed"
    assert not result.ghost
    assert result.chained_job is not None
    await _execute(engine, result.chained_job, worker="w2")
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.COMPLETED
    assert {s.stage_id: s.attempt for s in run.stages} == {"a": 1, "b": 2, "c": 1}
    completed = [e.stage_id for e in await _events(engine, run_id) if e.type == "stage:completed"]
    assert completed == ["a", "b", "c"]


async def test_a_cancel_between_chain_and_execution_makes_a_ghost(engine: Engine) -> None:
    """A run cancelled after the chained commit: the chained job's result is discarded
    (``ghost=True``), the stage stays CANCELLED, and nothing is enqueued after it."""
    run_id, job = await _first_job(engine)
    chained = (await _execute(engine, job)).chained_job
    assert chained is not None
    await engine.kernel.dispatch(c.RunCancel(workflow_run_id=run_id))
    result = await _execute(engine, chained)
    assert result.ghost
    assert result.chained_job is None
    stages = await _stages(engine, run_id)
    assert stages["b"].status is StageStatus.CANCELLED
    assert stages["b"].output is None
    assert (await _job(engine, chained.id)).status is JobStatus.CANCELLED
    assert (await engine.get_run(run_id)).status is RunStatus.CANCELLED
    completed = [e.stage_id for e in await _events(engine, run_id) if e.type == "stage:completed"]
    assert completed == ["a"]
    assert await _dequeue(engine) == []


async def test_a_chained_job_runs_without_its_hand_off(engine: Engine) -> None:
    """Executed by a kernel that holds no hand-off (dropped, or another kernel of the same
    worker), the chained job reads the stage it started instead of starting it again: the
    attempt is counted once and ``stage:started`` is not repeated."""
    run_id, job = await _first_job(engine)
    chained = (await _execute(engine, job)).chained_job
    assert chained is not None
    engine.kernel.deps.chains.clear()
    result = await _execute(engine, chained)
    assert result.outcome == "completed"
    assert not result.ghost
    b = (await _stages(engine, run_id))["b"]
    assert (b.status, b.attempt) == (StageStatus.COMPLETED, 1)
    started = [e for e in await _events(engine, run_id) if e.type == "stage:started"]
    assert [e.stage_id for e in started] == ["a", "b", "c"]


async def test_a_replayed_chained_execution_commits_nothing_twice(engine: Engine) -> None:
    """A second delivery of the chained job's execution (same idempotency key) replays
    the recorded result; another worker's execution of it is a ghost."""
    _, job = await _first_job(engine)
    chained = (await _execute(engine, job)).chained_job
    assert chained is not None
    foreign = await _execute(engine, chained, worker="w2", keyed=False)
    assert foreign.ghost  # not leased by w2: refused before its body runs
    assert chained.id in engine.kernel.deps.chains  # and w1's hand-off is still there
    first = await _execute(engine, chained)
    replay = await _execute(engine, chained)
    assert replay == first
    assert first.chained_job is not None
    assert CALLS == ["a", "b"]


async def test_execute_job_runs_the_chain_and_heartbeats_the_chained_job(
    engine: Engine, clock: FakeClock
) -> None:
    """``execute_job(chain=...)`` runs the chained jobs in the same call, extending the
    lease of the one that is running, and returns the first job's result."""
    run_id, job = await _first_job(engine)
    HOLD["b"] = asyncio.Event()
    ENTERED["b"] = asyncio.Event()
    task = asyncio.ensure_future(
        execute_job(engine.kernel, job, worker_id="w1", heartbeat_interval=0.01, chain=lambda: True)
    )
    async with asyncio.timeout(10):
        await ENTERED["b"].wait()
        b_job = (await _stages(engine, run_id))["b"].job_id
        assert b_job is not None
        leased_at = (await _job(engine, b_job)).heartbeat_at
        clock.advance(5)
        while (await _job(engine, b_job)).heartbeat_at == leased_at:  # noqa: ASYNC110 - polling stored state
            await asyncio.sleep(0.005)
    HOLD["b"].set()
    result = await asyncio.wait_for(task, 10)
    assert result is not None
    assert result.stage_id == "a"
    assert result.chained_job is not None
    assert (await engine.get_run(run_id)).status is RunStatus.COMPLETED
    assert CALLS == ["a", "b", "c"]


async def test_execute_job_releases_a_chained_job_it_will_not_run(engine: Engine) -> None:
    """When ``chain`` turns false during an execution (the worker is stopping), the job
    chained by its commit is handed back at once: QUEUED, due now, its stage PENDING."""
    run_id, job = await _first_job(engine)
    answers = iter([True])
    result = await execute_job(
        engine.kernel, job, worker_id="w1", chain=lambda: next(answers, False)
    )
    assert result is not None
    assert result.chained_job is not None
    assert len(engine.kernel.deps.chains) == 0
    stored = await _job(engine, result.chained_job.id)
    assert (stored.status, stored.worker_id) == (JobStatus.QUEUED, None)
    assert (await _stages(engine, run_id))["b"].status is StageStatus.PENDING
    (again,) = await _dequeue(engine)
    assert again.id == result.chained_job.id
    assert CALLS == ["a"]


async def test_a_worker_that_stopped_chaining_leaves_the_next_stage_queued(
    engine: Engine,
) -> None:
    """After ``chains.stop(worker)`` (the Worker calls it when it starts stopping) that
    worker's commits chain nothing: the next stage is queued for another worker."""
    run_id, job = await _first_job(engine)
    engine.kernel.deps.chains.stop("w1")
    result = await _execute(engine, job)
    assert result.outcome == "completed"
    assert result.chained_job is None
    (queued,) = await _dequeue(engine)
    assert queued.stage_id == "b"
    assert (await _stages(engine, run_id))["b"].status is StageStatus.PENDING


# -- chained claims (run.claimPending with chain) -----------------------------------------
async def _claim(engine: Engine, *, chain: int, worker: str = "w1") -> c.RunClaimPendingResult:
    return await engine.kernel.dispatch(
        c.RunClaimPending(worker_id=worker, max_claims=10, chain=chain)
    )


async def test_a_chained_claim_leases_and_starts_the_first_stage_of_up_to_n_runs(
    engine: Engine,
) -> None:
    """``chain=2`` over three PENDING runs: two first stages are leased to the claimer and
    started in the claim's commit (RUNNING, ``stage:started`` after ``workflow:started``),
    the third run's job is queued for any worker; each chained job then runs the run to
    completion with every stage started and committed once."""
    run_ids = [(await engine.start("seq", {"n": i})).run_id for i in range(3)]
    claim = await _claim(engine, chain=2)
    assert [r.workflow_run_id for r in claim.claimed] == run_ids
    chained = claim.chained_jobs
    assert [j.workflow_run_id for j in chained] == run_ids[:2]
    for job in chained:
        assert (job.stage_id, job.status, job.worker_id, job.attempts) == (
            "a",
            JobStatus.LEASED,
            "w1",
            1,
        )
        stored = await _job(engine, job.id)
        assert (stored.status, stored.worker_id) == (JobStatus.LEASED, "w1")
        a = (await _stages(engine, job.workflow_run_id))["a"]
        assert (a.status, a.attempt, a.job_id) == (StageStatus.RUNNING, 1, job.id)
        types = [e.type for e in await _events(engine, job.workflow_run_id)]
        assert types == ["workflow:created", "workflow:started", "stage:started"]
        assert job.id in engine.kernel.deps.chains
    (queued,) = await _dequeue(engine)  # the unchained run's job, nobody else's
    assert queued.workflow_run_id == run_ids[2]
    assert (await _stages(engine, run_ids[2]))["a"].status is StageStatus.PENDING
    for job in chained:
        current: Job | None = job
        while current is not None:
            current = (await _execute(engine, current)).chained_job
        run = await engine.get_run(job.workflow_run_id)
        assert run.status is RunStatus.COMPLETED
        assert {s.stage_id: s.attempt for s in run.stages} == {"a": 1, "b": 1, "c": 1}
        started = [e.stage_id for e in await _events(engine, run.id) if e.type == "stage:started"]
        assert started == ["a", "b", "c"]
    assert len(engine.kernel.deps.chains) == 0


async def test_a_claim_without_chain_queues_every_first_stage(engine: Engine) -> None:
    """The default ``chain=0`` leases nothing: the first stages are queued for any worker."""
    run_id = (await engine.start("seq", {"n": 1})).run_id
    claim = await _claim(engine, chain=0)
    assert claim.chained_jobs == []
    (queued,) = await _dequeue(engine)
    assert (queued.workflow_run_id, queued.worker_id) == (run_id, "w2")


async def test_a_cancel_between_chained_claim_and_execution_makes_a_ghost(
    engine: Engine,
) -> None:
    """A run cancelled after the chained claim: the first stage's result is discarded,
    the stage stays CANCELLED and nothing is enqueued after it."""
    run_id = (await engine.start("seq", {"n": 1})).run_id
    (job,) = (await _claim(engine, chain=1)).chained_jobs
    await engine.kernel.dispatch(c.RunCancel(workflow_run_id=run_id))
    result = await _execute(engine, job)
    assert result.ghost
    assert result.chained_job is None
    assert (await _stages(engine, run_id))["a"].status is StageStatus.CANCELLED
    assert (await _job(engine, job.id)).status is JobStatus.CANCELLED
    assert (await engine.get_run(run_id)).status is RunStatus.CANCELLED
    assert await _dequeue(engine) == []


async def test_a_crash_after_a_chained_claim_leaves_the_job_to_the_reaper(
    engine: Engine, clock: FakeClock
) -> None:
    """A claimer that dies after its chained claim leaves a lease that expires: the reaper
    requeues the job, another worker runs the first stage as attempt 2 and the run
    completes."""
    run_id = (await engine.start("seq", {"n": 1})).run_id
    (job,) = (await _claim(engine, chain=1)).chained_jobs
    engine.kernel.deps.chains.clear()  # the process that held the hand-off is gone
    clock.advance(61)
    reaped = await engine.kernel.dispatch(c.LeaseReapStale(stale_threshold=60))
    assert reaped.released == 1
    assert (await _stages(engine, run_id))["a"].status is StageStatus.PENDING
    clock.advance(60)  # past the retry backoff
    (again,) = await _dequeue(engine)
    assert (again.id, again.attempts) == (job.id, 2)
    current: Job | None = again
    while current is not None:
        current = (await _execute(engine, current, worker="w2")).chained_job
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.COMPLETED
    assert {s.stage_id: s.attempt for s in run.stages} == {"a": 2, "b": 1, "c": 1}


async def test_a_stopped_worker_claims_without_chaining(engine: Engine) -> None:
    """After ``chains.stop(worker)`` a claim with ``chain`` leases nothing to that worker."""
    await engine.start("seq", {"n": 1})
    engine.kernel.deps.chains.stop("w1")
    claim = await _claim(engine, chain=4)
    assert len(claim.claimed) == 1
    assert claim.chained_jobs == []
    assert len(await _dequeue(engine)) == 1


async def test_a_worker_runs_claimed_runs_in_chained_slots(engine: Engine) -> None:
    """A ``Worker`` claims as many runs as it has free slots with their first stages
    chained, so their jobs are never dequeued: every run completes with each stage run
    once, the slots never exceed the concurrency, and with no ``notify()`` and a 60 s
    tick interval, each freed slot claims the next PENDING run."""
    from treadle.runtime.worker import Worker

    run_ids = [(await engine.start("seq", {"n": i})).run_id for i in range(7)]
    worker = Worker(
        engine.kernel, worker_id="wk", concurrency=2, max_claims=2, orchestration_interval=60
    )
    dequeued: list[Job] = []
    assert engine.backend is not None
    transport = engine.backend.job_transport
    original = transport.dequeue

    async def spying_dequeue(*args: Any, **kwargs: Any) -> list[Job]:
        assert worker.in_flight <= 2
        jobs = await original(*args, **kwargs)
        dequeued.extend(jobs)
        return jobs

    transport.dequeue = spying_dequeue  # type: ignore[method-assign]
    try:
        async with worker, asyncio.timeout(30):
            done = [RunStatus.COMPLETED] * len(run_ids)
            while [(await engine.get_run(r)).status for r in run_ids] != done:  # noqa: ASYNC110 - polling stored state
                await asyncio.sleep(0.01)
    finally:
        del transport.dequeue
    assert sorted(CALLS) == sorted(["a", "b", "c"] * 7)
    for run_id in run_ids:
        run = await engine.get_run(run_id)
        assert {s.stage_id: s.attempt for s in run.stages} == {"a": 1, "b": 1, "c": 1}
    # Every claim (the first tick's, then one per freed slot) chained all it claimed, so
    # no job was ever queued: the dequeues found nothing.
    assert dequeued == []


async def test_a_queued_job_runs_although_the_first_tick_claims_nothing(engine: Engine) -> None:
    """The first tick holds every slot for the runs it may chain; claiming none, it frees
    them and wakes the job loop, which dequeues a job queued before the worker started,
    with poll and tick intervals far longer than the test (regression: on SQLite and
    PostgreSQL the job loop slept on the held slots for a wake-up that never came)."""
    from treadle.runtime.worker import Worker

    run_id = (await engine.start("seq", {"n": 1})).run_id
    await _claim(engine, chain=0, worker="another-worker")  # its first job is queued
    worker = Worker(engine.kernel, worker_id="wk", orchestration_interval=60, job_poll_interval=60)
    async with worker:
        assert await engine.handle(run_id).result(timeout=10) == {"n": 4}
    assert CALLS == ["a", "b", "c"]
