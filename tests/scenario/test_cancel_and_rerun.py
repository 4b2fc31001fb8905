"""Cancel at every state of a run, and rerun from a stage after failure or cancel."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, Suspend, WorkflowBuilder, define_batch_stage, define_stage
from treadle.kernel import commands as c
from treadle.kernel.errors import RunCancelledError
from treadle.kernel.model import JobStatus, RunStatus, StageStatus
from treadle.testing import RunHandle, TestEngine


class In(BaseModel):
    n: int


CALLS: list[str] = []


@define_stage(id="first", input=In, output=In)
async def first(ctx):  # type: ignore[no-untyped-def]
    CALLS.append("first")
    return In(n=ctx.input.n + 1)


@define_stage(id="second", input=In, output=In, retry=RetryPolicy(initial_delay=60.0))
async def second(ctx):  # type: ignore[no-untyped-def]
    CALLS.append("second")
    if ctx.input.n < 0:
        raise ConnectionError("negative")
    return In(n=ctx.input.n * 2)


WF = WorkflowBuilder("wf", input=In).pipe(first).pipe(second).build()


async def _assert_cancelled(te: TestEngine, run_id: str) -> None:
    await te.run_until_idle()
    run = await te.get_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert all(s.status.terminal for s in run.stages)
    assert not [j for j in te.job_transport.jobs.values() if j.status.live]
    assert te.event_sink.types(run_id)[-1] == "workflow:cancelled"
    await te.advance_time(timedelta(hours=1))
    with pytest.raises(RunCancelledError, match="cancelled"):
        await RunHandle(te, run_id).result()


async def test_cancel_pending_run() -> None:
    """A PENDING run cancels before any worker claims it, and is never claimed after."""
    CALLS.clear()
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    assert await te.cancel(handle.run_id, reason="changed my mind") is True
    await _assert_cancelled(te, handle.run_id)
    assert CALLS == []
    assert (await te.get_run(handle.run_id)).error == "changed my mind"


async def test_cancel_running_run_with_queued_job() -> None:
    """A RUNNING run with a queued job: the job is cancelled and never executes."""
    CALLS.clear()
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    assert await te.cancel(handle.run_id) is True
    await _assert_cancelled(te, handle.run_id)
    assert CALLS == []


async def test_cancel_while_stage_executes() -> None:
    """Cancelling from inside a running stage discards its result (a ghost); the next
    group never runs."""
    CALLS.clear()
    te = TestEngine([WF])

    async def cancelling(ctx):  # type: ignore[no-untyped-def]
        await te.cancel(ctx.run_id)
        return In(n=5)

    te.mock_stage("first", cancelling)
    handle = await te.start("wf", {"n": 1})
    await _assert_cancelled(te, handle.run_id)
    stages = {s.stage_id: s for s in (await te.get_run(handle.run_id)).stages}
    assert stages["first"].status is StageStatus.CANCELLED
    assert stages["first"].output is None
    assert CALLS == []


async def test_cancel_while_waiting_to_retry() -> None:
    """A stage waiting out its backoff is cancelled and its retry never runs."""
    CALLS.clear()
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": -5})
    await te.run_until_idle()
    assert CALLS == ["first", "second"]
    stage = (await te.get_run(handle.run_id)).stages[1]
    assert stage.status is StageStatus.PENDING
    assert stage.retryable is True
    assert await te.cancel(handle.run_id) is True
    await _assert_cancelled(te, handle.run_id)
    assert CALLS == ["first", "second"]


async def test_cancel_suspended_run() -> None:
    """A SUSPENDED run cancels; its suspended job is cancelled and never polled."""

    @define_batch_stage(id="batch", input=In, output=In)
    async def batch(ctx):  # type: ignore[no-untyped-def]
        return Suspend(state=1, poll_interval=timedelta(seconds=10))

    @batch.check_completion
    async def check(state, ctx):  # type: ignore[no-untyped-def]
        raise AssertionError("cancelled stages are not polled")

    te = TestEngine([WorkflowBuilder("b", input=In).pipe(batch).build()])
    handle = await te.start("b", {"n": 1})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    assert await te.cancel(handle.run_id) is True
    await _assert_cancelled(te, handle.run_id)
    assert {j.status for j in te.job_transport.jobs.values()} == {JobStatus.CANCELLED}


@pytest.mark.parametrize("n", [1, -1])
async def test_cancel_terminal_run_is_a_noop(n: int) -> None:
    """Cancelling a COMPLETED or FAILED run returns False and changes nothing."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": n})
    await te.advance_time(timedelta(hours=1))
    before = await te.get_run(handle.run_id)
    assert before.status in (RunStatus.COMPLETED, RunStatus.FAILED)
    assert await te.cancel(handle.run_id) is False
    after = await te.get_run(handle.run_id)
    assert after == before


async def test_rerun_after_failure_reuses_earlier_output() -> None:
    """After a failure is fixed, rerunFrom the failed stage keeps the earlier stage's
    output (it does not run again) and completes the run."""
    CALLS.clear()
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": -5})
    await te.advance_time(timedelta(hours=1))
    assert (await te.get_run(handle.run_id)).status is RunStatus.FAILED
    assert CALLS == ["first"] + ["second"] * 3
    te.mock_stage("second", lambda ctx: In(n=abs(ctx.input.n)))
    result = await te.dispatch(
        c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id="second")
    )
    assert result.deleted_stages == ["second"]
    assert await handle.result() == {"n": 4}
    assert CALLS.count("first") == 1
    run = await te.get_run(handle.run_id)
    assert run.error is None
    assert run.stages[1].attempt == 1


async def test_rerun_after_cancel_from_the_start() -> None:
    """A cancelled run can be rerun from its first stage and then completes."""
    CALLS.clear()
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    await te.cancel(handle.run_id)
    await te.dispatch(c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id="first"))
    assert await handle.result() == {"n": 4}
    assert CALLS == ["first", "second"]


async def test_a_running_stage_sees_ctx_cancelled_when_its_run_is_cancelled() -> None:
    """Cooperative cancellation: a stage body waiting on ctx.cancelled wakes when the run
    is cancelled, and whatever it returns is discarded as a ghost result."""
    import asyncio

    started = asyncio.Event()
    reasons: list[str | None] = []

    @define_stage(id="patient", input=In, output=In)
    async def patient(ctx):  # type: ignore[no-untyped-def]
        started.set()
        await ctx.cancelled.wait()
        reasons.append(ctx.cancelled.reason)
        return ctx.input

    te = TestEngine([WorkflowBuilder("patient-wf", input=In).pipe(patient).build()])
    handle = await te.start("patient-wf", {"n": 1})
    driver = asyncio.create_task(te.run_until_idle())
    await started.wait()
    assert await te.cancel(handle.run_id, reason="enough")
    await driver
    assert reasons == ["enough"]
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.stages[0].status is StageStatus.CANCELLED
