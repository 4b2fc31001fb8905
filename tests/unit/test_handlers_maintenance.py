"""Recovery sweeps: lease.reapStale and run.reapStuck."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.events import StageFailed, WorkflowFailed
from treadle.kernel.model import JobStatus, RunStatus, StageStatus, evolve
from treadle.testing import TestEngine


class In(BaseModel):
    n: int


@define_stage(id="a", input=In, output=In, retry=RetryPolicy(max_attempts=2, initial_delay=3.0))
async def a(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


@define_stage(id="b", input=In, output=In)
async def b(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


WF = WorkflowBuilder("wf", input=In).pipe(a).pipe(b).build()
PAR = WorkflowBuilder("par", input=In).parallel([a, b]).build()


async def _start_job(te: TestEngine, run_id: str, stage_id: str, worker: str = "dead") -> Any:
    """Lease the stage's job and mark the stage RUNNING, as a worker that then dies."""
    [job] = await te.job_transport.dequeue(worker, te.clock.now())
    async with te.persistence.transaction() as tx:
        stage = await tx.stages.get(run_id, stage_id)
        assert stage is not None
        await tx.stages.update(
            evolve(stage, {"status": StageStatus.RUNNING, "attempt": stage.attempt + 1})
        )
    return job


async def _stage(te: TestEngine, run_id: str, stage_id: str) -> Any:
    return next(s for s in (await te.get_run(run_id)).stages if s.stage_id == stage_id)


async def test_reap_stale_releases_with_backoff_then_fails_when_exhausted() -> None:
    """An expired lease is released with backoff; once max_attempts are used the job,
    the stage and the run fail."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    job = await _start_job(te, handle.run_id, "a")

    te.clock.advance(59)
    assert (await te.dispatch(c.LeaseReapStale(stale_threshold=60))).released == 0
    te.clock.advance(2)
    result = await te.dispatch(c.LeaseReapStale(stale_threshold=60))
    assert (result.released, result.failed) == (1, 0)
    stored = te.job_transport.jobs[job.id]
    assert stored.status is JobStatus.QUEUED
    assert stored.next_poll_at == te.clock.now() + timedelta(seconds=3)
    assert "lease expired" in (stored.last_error or "")
    stage = await _stage(te, handle.run_id, "a")
    assert stage.status is StageStatus.PENDING
    assert stage.retryable is True
    assert await te.job_transport.dequeue("w", te.clock.now()) == []

    te.clock.advance(3)
    job = await _start_job(te, handle.run_id, "a")
    assert job.attempts == 2
    te.clock.advance(61)
    result = await te.dispatch(c.LeaseReapStale(stale_threshold=60))
    assert (result.released, result.failed) == (0, 1)
    assert te.job_transport.jobs[job.id].status is JobStatus.FAILED
    stage = await _stage(te, handle.run_id, "a")
    assert stage.status is StageStatus.FAILED
    assert stage.retryable is False
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "'a'" in (run.error or "")
    assert "lease expired" in (run.error or "")
    failures = [
        e for e in await te.kernel.reads.events(handle.run_id) if isinstance(e, StageFailed)
    ]
    assert [f.will_retry for f in failures] == [True, False]
    assert failures[0].retry_at == failures[0].timestamp + timedelta(seconds=3)


async def test_reap_stale_ignores_fresh_leases_and_non_running_stages() -> None:
    """Fresh leases stay; a stale lease whose stage is not RUNNING only frees the job."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    [job] = await te.job_transport.dequeue("w", te.clock.now())  # stage never started
    te.clock.advance(120)
    result = await te.dispatch(c.LeaseReapStale(stale_threshold=60))
    assert result.released == 1
    assert te.job_transport.jobs[job.id].status is JobStatus.QUEUED
    assert (await _stage(te, handle.run_id, "a")).status is StageStatus.PENDING
    assert not [
        e for e in await te.kernel.reads.events(handle.run_id) if isinstance(e, StageFailed)
    ]


async def test_reaped_run_completes_after_release() -> None:
    """After a reap, the TestEngine retries the job and the run completes."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 5})
    await te.dispatch(c.RunClaimPending(worker_id=te.worker_id))
    await _start_job(te, handle.run_id, "a", worker="dead")
    te.clock.advance(61)
    await te.dispatch(c.LeaseReapStale(stale_threshold=60))
    await te.advance_time(3)
    assert await handle.result() == {"n": 5}


async def test_reap_stuck_re_enqueues_orphaned_pending_stage() -> None:
    """A RUNNING run whose current-group PENDING stage has no live job gets a new job."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 2})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    async with te.persistence.transaction() as tx:  # the job vanished (lost message)
        await te.job_transport.cancel_by_run(tx, handle.run_id)
    te.clock.advance(timedelta(minutes=29))
    nothing = await te.dispatch(c.RunReapStuck())
    assert (nothing.transitioned, nothing.failed) == (0, 0)
    te.clock.advance(timedelta(minutes=2))
    result = await te.dispatch(c.RunReapStuck())
    assert (result.transitioned, result.failed) == (1, 0)
    live = [j for j in te.job_transport.jobs.values() if j.status.live]
    assert [(j.stage_id, j.status) for j in live] == [("a", JobStatus.QUEUED)]
    assert (await te.get_run(handle.run_id)).updated_at == te.clock.now()
    assert await handle.result() == {"n": 2}


async def test_reap_stuck_resets_orphaned_running_stage() -> None:
    """A RUNNING stage whose job is gone is reset to PENDING and re-enqueued."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 2})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    job = await _start_job(te, handle.run_id, "a")
    async with te.persistence.transaction() as tx:
        await te.job_transport.fail(tx, job.id, "lost")
    te.clock.advance(timedelta(hours=1))
    result = await te.dispatch(c.RunReapStuck())
    assert result.transitioned == 1
    assert (await _stage(te, handle.run_id, "a")).status is StageStatus.PENDING
    assert await handle.result() == {"n": 2}


async def test_reap_stuck_applies_missed_transition() -> None:
    """A stuck run whose group is done but never advanced is advanced by the sweep."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 2})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    async with te.persistence.transaction() as tx:
        stage = await tx.stages.get(handle.run_id, "a")
        assert stage is not None
        await tx.stages.update(evolve(stage, {"status": StageStatus.COMPLETED, "output": {"n": 2}}))
        await te.job_transport.cancel_by_run(tx, handle.run_id)
    te.clock.advance(timedelta(hours=1))
    result = await te.dispatch(c.RunReapStuck())
    assert (result.transitioned, result.failed) == (1, 0)
    assert (await te.get_run(handle.run_id)).current_group == 1
    assert await handle.result() == {"n": 2}


async def test_reap_stuck_leaves_runs_with_live_work_alone() -> None:
    """A slow run with a live job is only touched (updated_at), not failed."""
    te = TestEngine([PAR])
    handle = await te.start("par", {"n": 2})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    te.clock.advance(timedelta(hours=1))
    result = await te.dispatch(c.RunReapStuck())
    assert (result.transitioned, result.failed) == (0, 0)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.RUNNING
    assert run.updated_at == te.clock.now()


async def test_reap_stuck_fails_run_with_nothing_live() -> None:
    """A RUNNING run with nothing live and nothing to re-enqueue is failed."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 2})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    async with te.persistence.transaction() as tx:
        await te.job_transport.cancel_by_run(tx, handle.run_id)
        run = await tx.runs.get(handle.run_id)
        assert run is not None
        await tx.runs.update(evolve(run, {"current_group": -1}))
    te.clock.advance(timedelta(hours=1))
    result = await te.dispatch(c.RunReapStuck())
    assert (result.transitioned, result.failed) == (0, 1)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "run stuck" in (run.error or "")
    assert {s.status for s in run.stages} == {StageStatus.CANCELLED}
    [failed] = [
        e for e in await te.kernel.reads.events(handle.run_id) if isinstance(e, WorkflowFailed)
    ]
    assert failed.error == run.error


async def test_reap_stuck_skips_unknown_workflows() -> None:
    """Runs of workflows this worker does not know are left alone."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 2})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    te.registry.unregister("wf")
    te.clock.advance(timedelta(hours=1))
    result = await te.dispatch(c.RunReapStuck())
    assert (result.transitioned, result.failed) == (0, 0)
    assert (await te.get_run(handle.run_id)).status is RunStatus.RUNNING


async def test_reap_stale_fails_exhausted_job_whose_attempt_never_started() -> None:
    """An exhausted stale job whose stage never got to RUNNING (its start commit was
    lost) still fails the stage and the run instead of leaving the run waiting."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    for _ in range(2):  # leased twice, the start never committed, max_attempts == 2
        [job] = await te.job_transport.dequeue("dead", te.clock.now())
        te.clock.advance(61)
        await te.dispatch(c.LeaseReapStale(stale_threshold=60))
        te.clock.advance(10)
    assert te.job_transport.jobs[job.id].status is JobStatus.FAILED
    stage = await _stage(te, handle.run_id, "a")
    assert stage.status is StageStatus.FAILED
    assert stage.attempt == 0
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "lease expired" in (run.error or "")


async def test_test_engine_releases_jobs_left_leased() -> None:
    """A job left LEASED by an execution that died (here: leased and never executed) is
    released by the TestEngine's next round, so the run still completes."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 3})
    await te.dispatch(c.RunClaimPending(worker_id=te.worker_id))
    [job] = await te.job_transport.dequeue("crashed-worker", te.clock.now())
    await te.run_until_idle()
    assert te.job_transport.jobs[job.id].status is JobStatus.QUEUED
    await te.advance_time(3)
    assert await handle.result() == {"n": 3}
