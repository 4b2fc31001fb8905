"""Async batch stages: suspend, poll, ready (with and without output), not ready,
failed, max_wait timeout, and suspension of the run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    Failed,
    NonRetryableError,
    NotReady,
    Ready,
    Suspend,
    WorkflowBuilder,
    define_batch_stage,
)
from treadle.kernel import commands as c
from treadle.kernel.events import StageFailed, StageSuspended, WorkflowSuspended
from treadle.kernel.model import JobStatus, RunStatus, StageStatus
from treadle.testing import TestEngine


class In(BaseModel):
    n: int


class Out(BaseModel):
    total: int


POLL = timedelta(minutes=5)
MAX_WAIT = timedelta(hours=1)


def _engine(check: Callable[[Any, Any], Any], body_calls: list[Any], **options: Any) -> TestEngine:
    @define_batch_stage(id="batch", input=In, output=Out, **options)
    async def batch(ctx):  # type: ignore[no-untyped-def]
        body_calls.append((ctx.attempt, ctx.resume_state))
        if ctx.resume_state is not None:
            return Out(total=ctx.resume_state["submitted"] * 2)
        return Suspend(state={"submitted": ctx.input.n}, poll_interval=POLL, max_wait=MAX_WAIT)

    batch.check_completion(check)
    return TestEngine([WorkflowBuilder("batch-wf", input=In).pipe(batch).build()])


async def _stage(te: TestEngine, run_id: str) -> Any:
    return (await te.get_run(run_id)).stages[0]


async def test_suspend_then_ready_with_output_completes() -> None:
    """The body suspends, the run is SUSPENDED, and Ready(output) completes the stage
    at the first due poll without running the body again."""
    checks: list[Any] = []

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        checks.append(state)
        return Ready(output={"total": state["submitted"] + 100})

    calls: list[Any] = []
    te = _engine(check, calls)
    handle = await te.start("batch-wf", {"n": 7})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    stage = run.stages[0]
    assert run.status is RunStatus.SUSPENDED
    assert stage.status is StageStatus.SUSPENDED
    assert stage.suspended_state == {"submitted": 7}
    assert stage.next_poll_at == te.clock.now() + POLL
    assert stage.suspend_deadline == te.clock.now() + MAX_WAIT
    job = next(iter(te.job_transport.jobs.values()))
    assert job.status is JobStatus.SUSPENDED
    assert any(isinstance(e, WorkflowSuspended) for e in te.events)
    [suspended] = [e for e in te.events if isinstance(e, StageSuspended)]
    assert suspended.next_poll_at == stage.next_poll_at
    assert checks == []

    await te.advance_time(POLL)
    assert checks == [{"submitted": 7}]
    assert await handle.result() == {"total": 107}
    assert calls == [(1, None)]
    assert te.job_transport.jobs[job.id].status is JobStatus.COMPLETED


async def test_ready_without_output_reruns_body_with_resume_state() -> None:
    """Ready() without output runs the body again, which reads ctx.resume_state."""

    def check(state, ctx):  # type: ignore[no-untyped-def]
        return Ready()

    calls: list[Any] = []
    te = _engine(check, calls)
    handle = await te.start("batch-wf", {"n": 4})
    await te.advance_time(POLL)
    assert await handle.result() == {"total": 8}
    assert calls == [(1, None), (2, {"submitted": 4})]


async def test_not_ready_reschedules_until_ready() -> None:
    """NotReady pushes next_poll_at out by the poll interval (or its own override)."""
    verdicts: list[Any] = [NotReady(), NotReady(poll_interval=timedelta(minutes=1)), Ready()]
    seen_at: list[Any] = []

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        seen_at.append(te.clock.now())
        return verdicts.pop(0)

    calls: list[Any] = []
    te = _engine(check, calls)
    start = te.clock.now()
    handle = await te.start("batch-wf", {"n": 1})
    await te.advance_time(POLL)
    stage = await _stage(te, handle.run_id)
    assert stage.status is StageStatus.SUSPENDED
    assert stage.next_poll_at == start + 2 * POLL
    await te.advance_time(POLL)
    stage = await _stage(te, handle.run_id)
    assert stage.next_poll_at == start + 2 * POLL + timedelta(minutes=1)
    await te.advance_time(timedelta(minutes=1))
    assert await handle.result() == {"total": 2}
    assert seen_at == [start + POLL, start + 2 * POLL, start + 2 * POLL + timedelta(minutes=1)]


async def test_failed_verdict_fails_stage_and_run() -> None:
    """Failed(message) fails the stage without retry and the run with that message."""

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        return Failed(message="batch rejected")

    calls: list[Any] = []
    te = _engine(check, calls)
    handle = await te.start("batch-wf", {"n": 1})
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert run.stages[0].error == "batch rejected"
    assert "batch rejected" in (run.error or "")
    assert "'batch'" in (run.error or "")
    assert te.job_transport.jobs[run.stages[0].job_id].status is JobStatus.FAILED
    [failed] = [e for e in te.events if isinstance(e, StageFailed)]
    assert failed.error == "batch rejected"


async def test_max_wait_timeout_fails_with_suspend_timeout_error() -> None:
    """Past max_wait the stage fails with SuspendTimeoutError, without calling check."""
    checks: list[Any] = []

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        checks.append(te.clock.now())
        return NotReady()

    calls: list[Any] = []
    te = _engine(check, calls)
    handle = await te.start("batch-wf", {"n": 1})
    await te.advance_time(MAX_WAIT)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "SuspendTimeoutError" in (run.stages[0].error or "")
    assert len(checks) == int(MAX_WAIT / POLL) - 1  # the poll at the deadline fails it


async def test_poll_command_reports_counts_and_resumed_runs() -> None:
    """stage.pollSuspended checks only due stages and reports resumed run ids."""

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        return Ready(output={"total": 0})

    calls: list[Any] = []
    te = _engine(check, calls)
    handle = await te.start("batch-wf", {"n": 1})
    await te.run_until_idle()
    early = await te.dispatch(c.StagePollSuspended())
    assert (early.checked, early.resumed, early.failed) == (0, 0, 0)
    te.clock.advance(POLL)
    result = await te.dispatch(c.StagePollSuspended())
    assert (result.checked, result.resumed, result.failed) == (1, 1, 0)
    assert result.resumed_workflow_run_ids == [handle.run_id]
    assert (await te.get_run(handle.run_id)).status is RunStatus.COMPLETED


async def test_positional_ready_completes_and_positional_failed_fails() -> None:
    """Ready(output) and Failed(message), written positionally as in DESIGN §3.1, act
    as their keyword forms."""

    async def ready(state, ctx):  # type: ignore[no-untyped-def]
        return Ready({"total": state["submitted"] + 1})

    te = _engine(ready, [])
    handle = await te.start("batch-wf", {"n": 2})
    await te.advance_time(POLL)
    assert await handle.result() == {"total": 3}

    async def failed(state, ctx):  # type: ignore[no-untyped-def]
        return Failed("batch rejected")

    te = _engine(failed, [])
    handle = await te.start("batch-wf", {"n": 2})
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert run.stages[0].error == "batch rejected"


async def test_a_check_that_keeps_raising_fails_the_stage_after_max_check_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each check that raises is logged and counted on the stage; the
    max_check_failures-th in a row fails the stage with the error, then the run, with
    stage:failed and workflow:failed, long before max_wait."""
    checks: list[Any] = []

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        checks.append(te.clock.now())
        raise ConnectionError("status endpoint down")

    te = _engine(check, [], max_check_failures=3)
    handle = await te.start("batch-wf", {"n": 1})
    with caplog.at_level(logging.WARNING, logger="treadle"):
        for failures in (1, 2):
            await te.advance_time(POLL)
            stage = await _stage(te, handle.run_id)
            assert (stage.status, stage.check_failures) == (StageStatus.SUSPENDED, failures)
        await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    stage = run.stages[0]
    assert len(checks) == 3
    assert (run.status, stage.status, stage.check_failures) == (
        RunStatus.FAILED,
        StageStatus.FAILED,
        3,
    )
    assert "ConnectionError: status endpoint down" in (stage.error or "")
    assert "3 time(s) in a row" in (stage.error or "")
    assert "ConnectionError: status endpoint down" in (run.error or "")
    [failed] = [e for e in te.events if isinstance(e, StageFailed)]
    assert failed.error == stage.error
    assert te.event_sink.types(handle.run_id)[-1] == "workflow:failed"
    warned = [r.getMessage() for r in caplog.records if "stage.check_failed" in r.getMessage()]
    assert len(warned) == 3
    assert all(handle.run_id in line and "batch" in line for line in warned)
    assert te.job_transport.jobs[stage.job_id].status is JobStatus.FAILED  # type: ignore[index]


async def test_the_default_bound_is_five_failed_checks() -> None:
    """Without max_check_failures a stage fails at the fifth failed check in a row."""

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        raise TimeoutError("slow")

    te = _engine(check, [])
    handle = await te.start("batch-wf", {"n": 1})
    await te.advance_time(POLL * 4)
    assert (await _stage(te, handle.run_id)).check_failures == 4
    await te.advance_time(POLL)
    stage = await _stage(te, handle.run_id)
    assert stage.status is StageStatus.FAILED
    assert "TimeoutError: slow" in (stage.error or "")


async def test_a_not_ready_check_resets_the_failure_count() -> None:
    """Failures must be consecutive: a check answering NotReady starts the count again."""
    answers: list[Any] = ["raise", "raise", NotReady(), "raise", "raise", Ready()]

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        answer = answers.pop(0)
        if answer == "raise":
            raise ConnectionError("flaky")
        return answer

    calls: list[Any] = []
    te = _engine(check, calls, max_check_failures=3)
    handle = await te.start("batch-wf", {"n": 5})
    await te.advance_time(POLL * 2)
    assert (await _stage(te, handle.run_id)).check_failures == 2
    await te.advance_time(POLL)
    assert (await _stage(te, handle.run_id)).check_failures == 0
    await te.advance_time(POLL * 2)
    assert (await _stage(te, handle.run_id)).check_failures == 2
    await te.advance_time(POLL)
    assert await handle.result() == {"total": 10}
    assert (await _stage(te, handle.run_id)).check_failures == 0


async def test_a_check_raising_non_retryable_error_fails_at_once() -> None:
    """NonRetryableError from a check fails the stage at the first poll, as from a body."""

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        raise NonRetryableError("batch was deleted")

    te = _engine(check, [])
    handle = await te.start("batch-wf", {"n": 1})
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert run.stages[0].error == "NonRetryableError: batch was deleted"


async def test_check_errors_retry_next_interval_and_bad_verdicts_fail() -> None:
    """A check that raises is tried again at the next poll; one returning a wrong type
    fails."""
    answers: list[Any] = ["raise", 42]

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        answer = answers.pop(0)
        if answer == "raise":
            raise ConnectionError("status endpoint down")
        return answer

    calls: list[Any] = []
    te = _engine(check, calls)
    handle = await te.start("batch-wf", {"n": 1})
    await te.advance_time(POLL)
    assert (await _stage(te, handle.run_id)).status is StageStatus.SUSPENDED
    await te.advance_time(POLL)
    stage = await _stage(te, handle.run_id)
    assert stage.status is StageStatus.FAILED
    assert "returned 42" in (stage.error or "")


async def test_ready_with_invalid_output_fails_naming_field() -> None:
    """Ready(output) is validated against the output model; a bad shape fails the stage."""

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        return Ready(output={"wrong": 1})

    calls: list[Any] = []
    te = _engine(check, calls)
    handle = await te.start("batch-wf", {"n": 1})
    await te.advance_time(POLL)
    stage = await _stage(te, handle.run_id)
    assert stage.status is StageStatus.FAILED
    assert "output.total" in (stage.error or "")


async def test_batch_stage_without_check_fails_at_first_poll() -> None:
    """A suspended stage with no check_completion function fails at its first poll."""

    @define_batch_stage(id="batch", input=In, output=Out)
    async def batch(ctx):  # type: ignore[no-untyped-def]
        return Suspend(state=None, poll_interval=POLL)

    te = TestEngine([WorkflowBuilder("batch-wf", input=In).pipe(batch).build()])
    handle = await te.start("batch-wf", {"n": 1})
    await te.advance_time(POLL)
    stage = await _stage(te, handle.run_id)
    assert stage.status is StageStatus.FAILED
    assert "no check_completion" in (stage.error or "")


async def test_check_cannot_mutate_stored_state() -> None:
    """The check receives a copy of the suspended state; mutations are not stored."""

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        state["submitted"] = 999
        assert ctx.resume_state == {"submitted": 3}
        return NotReady()

    calls: list[Any] = []
    te = _engine(check, calls)
    handle = await te.start("batch-wf", {"n": 3})
    await te.advance_time(POLL)
    assert (await _stage(te, handle.run_id)).suspended_state == {"submitted": 3}


async def test_cancel_suspended_run_stops_polling() -> None:
    """Cancelling a suspended run cancels the stage and its job; polls skip it."""
    checks: list[Any] = []

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        checks.append(1)
        return Ready(output={"total": 1})

    calls: list[Any] = []
    te = _engine(check, calls)
    handle = await te.start("batch-wf", {"n": 3})
    await te.run_until_idle()
    assert await te.cancel(handle.run_id) is True
    await te.advance_time(POLL * 2)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.stages[0].status is StageStatus.CANCELLED
    assert checks == []
    assert {j.status for j in te.job_transport.jobs.values()} == {JobStatus.CANCELLED}
