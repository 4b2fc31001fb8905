"""``release_job``: a worker hands back only a lease it still holds, never a job that
committed or moved on meanwhile."""

from __future__ import annotations

from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.kernel import create_kernel
from treadle.kernel.model import JobStatus
from treadle.runtime import open_backend
from treadle.runtime.jobs import release_job


class Num(BaseModel):
    n: int


@define_stage(id="s", input=Num, output=Num)
async def s(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


WF = WorkflowBuilder("wf", input=Num).pipe(s).build()


async def test_release_only_acts_on_a_lease_the_worker_still_holds() -> None:
    """Another worker's lease and a completed job are left alone (False); a held lease
    goes back to QUEUED, due now (True), with no stage event since it never started."""
    backend = await open_backend("memory://")
    kernel = create_kernel(
        persistence=backend.persistence,
        job_transport=backend.job_transport,
        blob_store=backend.blob_store,
        event_sink=backend.event_sink,
        scheduler=backend.scheduler,
        clock=backend.clock,
        registry=[WF],
    )
    created = await kernel.dispatch(c.RunCreate(workflow_id="wf", input={"n": 1}))
    await kernel.dispatch(c.RunClaimPending(worker_id="w", max_claims=1))
    (job,) = await backend.job_transport.dequeue("w1", backend.clock.now())
    assert not await release_job(kernel, job, worker_id="w2")
    assert await release_job(kernel, job, worker_id="w1")
    transport = backend.job_transport
    assert transport.jobs[job.id].status is JobStatus.QUEUED  # type: ignore[attr-defined]
    assert not await release_job(kernel, job, worker_id="w1")  # no longer leased
    async with backend.persistence.transaction() as tx:
        events = [e.type for e in await tx.events_for_run(created.workflow_run_id)]
    assert "stage:failed" not in events
    (again,) = await transport.dequeue("w1", backend.clock.now())
    await kernel.dispatch(c.JobExecute(job_id=again.id, worker_id="w1"))
    assert not await release_job(kernel, again, worker_id="w1")  # committed meanwhile
    assert transport.jobs[job.id].status is JobStatus.COMPLETED  # type: ignore[attr-defined]
    await backend.close()
