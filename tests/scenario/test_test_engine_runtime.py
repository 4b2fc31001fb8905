"""``TestEngine`` drives the worker's own tick and job path (``treadle.runtime``)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.runtime.jobs import job_idempotency_key
from treadle.testing import TestEngine


class N(BaseModel):
    n: int


@define_stage(id="double", input=N, output=N)
async def double(ctx):  # type: ignore[no-untyped-def]
    return N(n=ctx.input.n * 2)


PIPELINE = WorkflowBuilder("doubler", input=N).pipe(double).build()


async def test_a_lost_job_is_recovered_by_the_ticks_stuck_run_sweep() -> None:
    """A RUNNING run whose job vanished is repaired by the maintenance tick's
    ``reap_stuck`` step once it is idle past the threshold, as a worker's tick does."""
    te = TestEngine([PIPELINE])
    handle = await te.start("doubler", {"n": 2})
    await te.dispatch(c.RunClaimPending(worker_id=te.worker_id))
    async with te.persistence.transaction() as tx:
        assert await te.job_transport.cancel_by_run(tx, handle.run_id) == 1
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status.value == "RUNNING"
    await te.advance_time(timedelta(minutes=31))
    assert await handle.result() == {"n": 4}


async def test_a_dequeued_job_is_keyed_per_attempt_by_the_runtime() -> None:
    """A job the harness dequeues (not chained) gets the runtime's per-attempt key, so a
    replay of the same attempt returns the recorded result."""
    te = TestEngine([PIPELINE], chain=False)
    handle = await te.start("doubler", {"n": 5})
    await te.dispatch(c.RunClaimPending(worker_id=te.worker_id))
    (job,) = te.job_transport.jobs.values()
    await te.run_until_idle()
    assert await handle.result() == {"n": 10}
    leased = job.model_copy(update={"attempts": 1})
    replay = await te.dispatch(
        c.JobExecute(
            job_id=job.id,
            worker_id=te.worker_id,
            idempotency_key=job_idempotency_key(leased),
        )
    )
    assert replay.outcome == "completed"
    assert replay.output == {"n": 10}
