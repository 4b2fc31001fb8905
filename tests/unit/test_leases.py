"""``settle_lease``: the one path that releases or fails a leased job without a verdict
from its stage, reached through ``job.release`` (a host giving the job back, or after
``job.execute`` raised) and ``lease.reapStale`` (a dead worker). One table over its
cases; each row checks the job, the stage, the events and the run together."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.model import JobStatus, RunStatus, StageStatus, evolve
from treadle.runtime import open_backend
from treadle.testing import FakeClock

POLICY = RetryPolicy(max_attempts=3, initial_delay=10.0, backoff=2.0, jitter=0.5)


class Num(BaseModel):
    n: int


@define_stage(id="s", input=Num, output=Num, retry=POLICY)
async def s(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


WF = WorkflowBuilder("wf", input=Num).pipe(s).build()


@dataclass(frozen=True)
class Case:
    how: str  # "interrupted" | "errored" (job.release) | "expired" (lease.reapStale)
    attempts: int  # the lease's attempt (of POLICY's 3)
    stage_running: bool  # phase 1 committed (stage RUNNING) before the lease ended
    job: JobStatus
    job_attempts: int
    due: str  # "now" | "backoff" | "-"
    stage: StageStatus
    stage_attempt: int
    event: tuple[bool, str] | None  # (will_retry, retry_at kind) of the stage:failed
    run: RunStatus


CASES = [
    # The host stops on purpose: the attempt is refunded, due at once, never failed.
    Case("interrupted", 1, True, JobStatus.QUEUED, 0, "now", StageStatus.PENDING, 0,
         (True, "now"), RunStatus.RUNNING),
    Case("interrupted", 3, True, JobStatus.QUEUED, 2, "now", StageStatus.PENDING, 2,
         (True, "now"), RunStatus.RUNNING),
    Case("interrupted", 1, False, JobStatus.QUEUED, 0, "now", StageStatus.PENDING, 0,
         None, RunStatus.RUNNING),
    # job.execute raised: the attempt counts, backoff, failed at max_attempts.
    Case("errored", 1, True, JobStatus.QUEUED, 1, "backoff", StageStatus.PENDING, 1,
         (True, "backoff"), RunStatus.RUNNING),
    Case("errored", 3, True, JobStatus.FAILED, 3, "-", StageStatus.FAILED, 3,
         (False, "-"), RunStatus.FAILED),
    Case("errored", 1, False, JobStatus.QUEUED, 1, "backoff", StageStatus.PENDING, 0,
         None, RunStatus.RUNNING),
    Case("errored", 3, False, JobStatus.FAILED, 3, "-", StageStatus.FAILED, 0,
         (False, "-"), RunStatus.FAILED),
    # The worker died: exactly as errored (same backoff, same seed).
    Case("expired", 1, True, JobStatus.QUEUED, 1, "backoff", StageStatus.PENDING, 1,
         (True, "backoff"), RunStatus.RUNNING),
    Case("expired", 3, True, JobStatus.FAILED, 3, "-", StageStatus.FAILED, 3,
         (False, "-"), RunStatus.FAILED),
    Case("expired", 3, False, JobStatus.FAILED, 3, "-", StageStatus.FAILED, 0,
         (False, "-"), RunStatus.FAILED),
]  # fmt: skip


async def _leased(attempts: int, stage_running: bool, workflows: list[Any] | None = None) -> Any:
    """A run whose one job is leased to "w" at ``attempts``, its stage RUNNING (phase 1
    committed for that attempt) or still PENDING."""
    backend = await open_backend("memory://", clock=FakeClock())
    kernel = backend.kernel(workflows or [WF])
    created = await kernel.dispatch(c.RunCreate(workflow_id="wf", input={"n": 1}))
    await kernel.dispatch(c.RunClaimPending(worker_id="w", max_claims=1))
    [job] = await backend.job_transport.dequeue("w", backend.clock.now())
    transport: Any = backend.job_transport
    job = transport.jobs[job.id] = evolve(job, {"attempts": attempts})
    if stage_running:
        async with backend.persistence.transaction() as tx:
            stage = await tx.stages.get(created.workflow_run_id, "s")
            changes = {"status": StageStatus.RUNNING, "attempt": attempts, "job_id": job.id}
            await tx.stages.update(evolve(stage, changes))
    return backend, kernel, job, created.workflow_run_id


async def _end(kernel: Any, job: Any, how: str) -> None:
    if how == "expired":
        reaped = await kernel.dispatch(c.LeaseReapStale(stale_threshold=timedelta(seconds=-1)))
        assert reaped.released + reaped.failed == 1
        return
    result = await kernel.dispatch(
        c.JobRelease(job_id=job.id, worker_id="w", attempt=job.attempts, reason=how, error="x")
    )
    assert result.released


@pytest.mark.parametrize("case", CASES, ids=lambda k: f"{k.how}-{k.attempts}-{k.stage_running}")
async def test_settle_lease(case: Case) -> None:
    """Each way a lease ends without a verdict leaves job, stage, events and run as the
    row says; the backoff is the stage's policy with the one seed ``run:stage``."""
    backend, kernel, job, run_id = await _leased(case.attempts, case.stage_running)
    now = backend.clock.now()
    await _end(kernel, job, case.how)
    stored = backend.job_transport.jobs[job.id]  # type: ignore[attr-defined]
    backoff = now + POLICY.delay_for(case.attempts, seed=f"{run_id}:s")
    assert (stored.status, stored.attempts) == (case.job, case.job_attempts)
    if case.due != "-":
        assert stored.next_poll_at == (now if case.due == "now" else backoff)
    run = await kernel.reads.get_run(run_id)
    [stage] = run.stages
    assert (stage.status, stage.attempt) == (case.stage, case.stage_attempt)
    assert run.status is case.run
    async with backend.persistence.transaction() as tx:
        failed = [e for e in await tx.outbox.events_for_run(run_id) if e.type == "stage:failed"]
    if case.event is None:
        assert failed == []
    else:
        [event] = failed
        will_retry, due = case.event
        assert event.will_retry is will_retry
        assert event.retry_at == {"now": now, "backoff": backoff, "-": None}[due]
    await backend.aclose()


async def test_release_changes_nothing_unless_this_worker_holds_this_attempt() -> None:
    """A release from another worker, or for an earlier attempt of the lease, reports
    released=False and leaves the job leased."""
    backend, kernel, job, _ = await _leased(2, True)
    for worker_id, attempt in (("other", 2), ("w", 1)):
        result = await kernel.dispatch(
            c.JobRelease(job_id=job.id, worker_id=worker_id, attempt=attempt, reason="errored")
        )
        assert result.released is False
    stored = backend.job_transport.jobs[job.id]  # type: ignore[attr-defined]
    assert (stored.status, stored.attempts) == (JobStatus.LEASED, 2)
    await backend.aclose()


async def test_backoff_follows_the_runs_pinned_version() -> None:
    """A run started under version 1 is retried with version 1's policy even after
    version 2 (another backoff) is registered: the lookup is by the pinned version."""

    @define_stage(
        id="s", input=Num, output=Num, retry=RetryPolicy(initial_delay=500.0, max_delay=500.0)
    )
    async def s_v2(ctx):  # type: ignore[no-untyped-def]
        return ctx.input

    backend, kernel, job, run_id = await _leased(1, True)
    kernel.deps.registry.register(WorkflowBuilder("wf", input=Num, version="2").pipe(s_v2).build())
    now = backend.clock.now()
    await _end(kernel, job, "errored")
    stored = backend.job_transport.jobs[job.id]  # type: ignore[attr-defined]
    assert stored.next_poll_at == now + POLICY.delay_for(1, seed=f"{run_id}:s")
    await backend.aclose()
