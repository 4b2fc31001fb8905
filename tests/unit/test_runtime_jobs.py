"""``release_job``: a worker hands back only a lease it still holds, never a job that
committed or moved on meanwhile."""

from __future__ import annotations

from typing import Any

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
    kernel = backend.kernel([WF])
    created = await kernel.dispatch(c.RunCreate(workflow_id="wf", input={"n": 1}))
    await kernel.dispatch(c.RunClaimPending(worker_id="w", max_claims=1))
    (job,) = await backend.job_transport.dequeue("w1", backend.clock.now())
    assert not await release_job(kernel, job, worker_id="w2")
    assert await release_job(kernel, job, worker_id="w1")
    transport = backend.job_transport
    assert transport.jobs[job.id].status is JobStatus.QUEUED  # type: ignore[attr-defined]
    assert not await release_job(kernel, job, worker_id="w1")  # no longer leased
    async with backend.persistence.transaction() as tx:
        events = [e.type for e in await tx.outbox.events_for_run(created.workflow_run_id)]
    assert "stage:failed" not in events
    (again,) = await transport.dequeue("w1", backend.clock.now())
    await kernel.dispatch(c.JobExecute(job_id=again.id, worker_id="w1"))
    assert not await release_job(kernel, again, worker_id="w1")  # committed meanwhile
    assert transport.jobs[job.id].status is JobStatus.COMPLETED  # type: ignore[attr-defined]
    await backend.aclose()


async def test_heartbeat_tells_a_running_step_its_run_was_cancelled_elsewhere() -> None:
    """Another process cancels the run: this worker's next heartbeat finds its job no
    longer leased, the step in flight sees ctx.cancelled, and its result is discarded."""
    import asyncio

    from treadle import WorkflowContext, workflow
    from treadle.runtime.jobs import execute_job

    started = asyncio.Event()

    async def slow(n: int) -> int:
        info = WorkflowContext.current_step()
        assert info is not None
        started.set()
        await info.cancelled.wait()
        return n

    @workflow(id="cw", input=Num, output=int)
    async def cw(ctx: WorkflowContext, num: Num) -> int:
        return int(await ctx.step("slow", slow, num.n))

    backend = await open_backend("memory://")

    def kernel_of_a_process() -> Any:
        return create_kernel(
            persistence=backend.persistence,
            job_transport=backend.job_transport,
            blob_store=backend.blob_store,
            event_sink=backend.event_sink,
            scheduler=backend.scheduler,
            clock=backend.clock,
            registry=[cw],
        )

    here, elsewhere = kernel_of_a_process(), kernel_of_a_process()
    created = await here.dispatch(c.RunCreate(workflow_id="cw", input={"n": 1}))
    await here.dispatch(c.RunClaimPending(worker_id="w1"))
    (job,) = await backend.job_transport.dequeue("w1", backend.clock.now())
    running = asyncio.create_task(execute_job(here, job, worker_id="w1", heartbeat_interval=0.01))
    async with asyncio.timeout(10):
        await started.wait()
        await elsewhere.dispatch(c.RunCancel(workflow_run_id=created.workflow_run_id))
        result = await running
    assert result is not None
    assert result.ghost
    assert (await here.reads.get_run(created.workflow_run_id)).status.value == "CANCELLED"
    await backend.aclose()


async def test_a_dequeued_attempt_is_keyed_and_a_chained_one_is_not() -> None:
    """A dequeued job's attempt may be delivered again (a redelivered message), so its
    result is recorded under ``job_idempotency_key``; the stages a chained commit handed
    to this process cannot be, so their executions record nothing."""
    from treadle.runtime.jobs import execute_job, job_idempotency_key

    @define_stage(id="t", input=Num, output=Num)
    async def t(ctx):  # type: ignore[no-untyped-def]
        return ctx.input

    two = WorkflowBuilder("two", input=Num).pipe(s).pipe(t).build()
    backend = await open_backend("memory://")
    kernel = backend.kernel([two])
    await kernel.dispatch(c.RunCreate(workflow_id="two", input={"n": 1}))
    await kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    (job,) = await backend.job_transport.dequeue("w1", backend.clock.now())
    result = await execute_job(kernel, job, worker_id="w1", chain=lambda: True)
    assert result is not None
    chained = result.chained_job
    assert chained is not None  # stage "t" ran in the same call, handed over in memory
    async with backend.persistence.transaction() as tx:
        first = await tx.idempotency.get(job_idempotency_key(job), "job.execute")
        second = await tx.idempotency.get(job_idempotency_key(chained), "job.execute")
    assert first is not None
    assert second is None
    run = await kernel.reads.get_run(job.workflow_run_id)
    assert run.status.value == "COMPLETED"
    await backend.aclose()
