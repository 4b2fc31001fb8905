"""After a storage outage, a job whose release failed is released as soon as storage
answers again (``ReleaseRetries``), not left to its lease expiring."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, define_stage
from treadle.adapters.logging import structlog_logger
from treadle.kernel import commands as c
from treadle.kernel.errors import TransientStorageError
from treadle.kernel.kernel import create_kernel
from treadle.kernel.model import JobStatus, StageStatus
from treadle.runtime import open_backend
from treadle.runtime.jobs import execute_job
from treadle.runtime.releases import ReleaseRetries
from treadle.testing import FakeClock

POLICY = RetryPolicy(max_attempts=3, initial_delay=30.0)


class Outage:
    """A Persistence that refuses every transaction while ``down`` (a restarting server)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False
        self.refused = asyncio.Event()

    @asynccontextmanager
    async def transaction(self, **kw: Any) -> AsyncIterator[Any]:
        if self.down:
            self.refused.set()
            raise TransientStorageError("the database system is shutting down")
        async with self.inner.transaction(**kw) as tx:
            yield tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


OUTAGE: dict[str, Outage] = {}


class Num(BaseModel):
    n: int


@define_stage(id="s", input=Num, output=Num, retry=POLICY)
async def s(ctx):  # type: ignore[no-untyped-def]
    OUTAGE["now"].down = True  # the server restarts while the stage runs
    return ctx.input


WF = WorkflowBuilder("wf", input=Num).pipe(s).build()


async def test_a_release_that_failed_during_an_outage_goes_through_when_storage_returns() -> None:
    """job.execute's commit and both releases fail while the database is down; the job
    stays LEASED with its release pending, and once storage answers the retry requeues it
    with the stage's backoff (attempt counted), without waiting for the lease to expire."""
    clock = FakeClock()
    backend = await open_backend("memory://", clock=clock)
    outage = OUTAGE["now"] = Outage(backend.persistence)
    kernel = create_kernel(
        persistence=outage,  # type: ignore[arg-type]
        job_transport=backend.job_transport,
        blob_store=backend.blob_store,
        event_sink=backend.event_sink,
        scheduler=backend.scheduler,
        clock=clock,
        registry=[WF],
    )
    created = await kernel.dispatch(c.RunCreate(workflow_id="wf", input={"n": 1}))
    await kernel.dispatch(c.RunClaimPending(worker_id="w", max_claims=1))
    [job] = await backend.job_transport.dequeue("w", clock.now())
    retries = ReleaseRetries(kernel, structlog_logger("test"), initial_delay=0.01, max_delay=0.05)
    result = await execute_job(kernel, job, worker_id="w", retries=retries)
    assert result is None  # the commit failed
    transport: Any = backend.job_transport
    assert transport.jobs[job.id].status is JobStatus.LEASED
    assert retries.pending == 1
    outage.refused.clear()
    await asyncio.wait_for(outage.refused.wait(), 10)  # a retry reached storage, still down
    assert transport.jobs[job.id].status is JobStatus.LEASED  # still down: nothing moved
    assert retries.pending == 1
    outage.down = False
    await asyncio.wait_for(retries.wait_idle(), 10)
    stored = transport.jobs[job.id]
    assert (stored.status, stored.attempts) == (JobStatus.QUEUED, 1)
    assert stored.next_poll_at == clock.now() + POLICY.delay_for(
        1, seed=f"{created.workflow_run_id}:s"
    )
    run = await kernel.reads.get_run(created.workflow_run_id)
    assert run.stages[0].status is StageStatus.PENDING
    await retries.aclose()
    await backend.aclose()


async def test_retries_stop_once_the_lease_is_no_longer_ours() -> None:
    """A pending release for a lease that moved on (reaped and re-leased meanwhile) is
    dropped after one successful dispatch reporting released=False."""
    clock = FakeClock()
    backend = await open_backend("memory://", clock=clock)
    kernel = backend.kernel([WF])
    await kernel.dispatch(c.RunCreate(workflow_id="wf", input={"n": 1}))
    await kernel.dispatch(c.RunClaimPending(worker_id="w", max_claims=1))
    [job] = await backend.job_transport.dequeue("w", clock.now())
    retries = ReleaseRetries(kernel, structlog_logger("test"), initial_delay=0.01)
    stale = c.JobRelease(job_id=job.id, worker_id="w", attempt=7, reason="errored")
    retries.add(stale)
    await asyncio.wait_for(retries.wait_idle(), 10)
    assert retries.pending == 0
    transport: Any = backend.job_transport
    assert transport.jobs[job.id].status is JobStatus.LEASED  # untouched
    await retries.aclose()
    await backend.aclose()
