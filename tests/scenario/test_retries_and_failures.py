"""Retries with backoff on the virtual clock, retries that end in success, and
terminal failures that fail the run and cancel what is still live."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, define_stage
from treadle.kernel.errors import RunFailedError, TreadleError
from treadle.kernel.events import StageFailed, StageStarted, WorkflowFailed
from treadle.kernel.model import JobStatus, RunStatus, StageStatus
from treadle.testing import TestEngine


class In(BaseModel):
    n: int


def _flaky(failures: int, policy: RetryPolicy, calls: list[int]):  # type: ignore[no-untyped-def]
    @define_stage(id="flaky", input=In, output=In, retry=policy)
    async def flaky(ctx):  # type: ignore[no-untyped-def]
        calls.append(ctx.attempt)
        if ctx.attempt <= failures:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return In(n=ctx.input.n + ctx.attempt)

    return flaky


async def test_retries_then_success() -> None:
    """A stage failing twice then succeeding completes the run on its third attempt."""
    calls: list[int] = []
    policy = RetryPolicy(max_attempts=3, initial_delay=1.0, backoff=2.0)
    te = TestEngine([WorkflowBuilder("wf", input=In).pipe(_flaky(2, policy, calls)).build()])
    handle = await te.start("wf", {"n": 10})
    await te.advance_time(10)
    assert await handle.result() == {"n": 13}
    assert calls == [1, 2, 3]
    run = await te.get_run(handle.run_id)
    assert run.stages[0].attempt == 3
    assert run.stages[0].error is None
    failures = [e for e in te.events if isinstance(e, StageFailed)]
    assert [(f.attempt, f.will_retry) for f in failures] == [(1, True), (2, True)]
    starts = [e.timestamp for e in te.events if isinstance(e, StageStarted)]
    t0 = starts[0]
    assert starts == [t0, t0 + timedelta(seconds=1), t0 + timedelta(seconds=3)]


async def test_backoff_is_honoured_on_the_virtual_clock() -> None:
    """A failed job is not available before now+delay; advance_time(delay) runs it."""
    calls: list[int] = []
    policy = RetryPolicy(
        max_attempts=2, initial_delay=timedelta(minutes=10), max_delay=timedelta(hours=1)
    )
    te = TestEngine([WorkflowBuilder("wf", input=In).pipe(_flaky(1, policy, calls)).build()])
    handle = await te.start("wf", {"n": 0})
    await te.run_until_idle()
    failed_at = te.clock.now()
    [job] = te.job_transport.jobs.values()
    assert job.status is JobStatus.QUEUED
    assert job.next_poll_at == failed_at + timedelta(minutes=10)
    assert (
        await te.job_transport.dequeue("probe", failed_at + timedelta(minutes=9, seconds=59)) == []
    )
    await te.advance_time(timedelta(minutes=9, seconds=59))
    assert calls == [1]
    with pytest.raises(TreadleError, match="advance_time"):
        await handle.result()
    await te.advance_time(1)
    assert calls == [1, 2]
    assert await handle.result() == {"n": 2}
    [failed] = [e for e in te.events if isinstance(e, StageFailed)]
    assert failed.retry_at == failed_at + timedelta(minutes=10)


async def test_terminal_failure_fails_run_and_cancels_siblings() -> None:
    """Exhausted retries fail the stage, the run (error names the stage) and cancel a
    sibling still waiting; later groups never run."""
    calls: list[int] = []
    later: list[int] = []
    policy = RetryPolicy(max_attempts=2, initial_delay=1.0)

    @define_stage(id="slow", input=In, output=In, retry=RetryPolicy(initial_delay=100.0))
    async def slow(ctx):  # type: ignore[no-untyped-def]
        raise ConnectionError("still warming up")

    @define_stage(id="after", input="none", output=In)
    async def after(ctx):  # type: ignore[no-untyped-def]
        later.append(1)
        return In(n=0)

    wf = (
        WorkflowBuilder("wf", input=In)
        .parallel([_flaky(99, policy, calls), slow])
        .pipe(after)
        .build()
    )
    te = TestEngine([wf])
    handle = await te.start("wf", {"n": 0})
    await te.advance_time(5)
    with pytest.raises(RunFailedError) as info:
        await handle.result()
    assert info.value.run_id == handle.run_id
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert run.error.startswith("stage 'flaky' failed: ConnectionError")
    statuses = {s.stage_id: s.status for s in run.stages}
    assert statuses == {
        "flaky": StageStatus.FAILED,
        "slow": StageStatus.CANCELLED,
        "after": StageStatus.CANCELLED,
    }
    assert calls == [1, 2]
    assert later == []
    assert all(not j.status.live for j in te.job_transport.jobs.values())
    [failed] = [e for e in te.events if isinstance(e, WorkflowFailed)]
    assert failed.stage_id == "flaky"
    await te.advance_time(1000)  # the cancelled sibling's retry never happens
    assert (await te.get_run(handle.run_id)).status is RunStatus.FAILED


async def test_user_listed_non_retryable_errors_fail_at_once() -> None:
    """Exception types in RetryPolicy.non_retryable fail the stage on the first attempt."""

    class DeclinedError(Exception):
        pass

    @define_stage(
        id="pay",
        input=In,
        output=In,
        retry=RetryPolicy(max_attempts=5, non_retryable=(DeclinedError,)),
    )
    async def pay(ctx):  # type: ignore[no-untyped-def]
        raise DeclinedError("card declined")

    te = TestEngine([WorkflowBuilder("wf", input=In).pipe(pay).build()])
    handle = await te.start("wf", {"n": 0})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert run.stages[0].attempt == 1
    assert "DeclinedError: card declined" in (run.error or "")
