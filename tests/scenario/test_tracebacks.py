"""A failing stage or step keeps its traceback, shortened to the user's frames, on the
stage (``StageRun.error_traceback``, through ``engine.get_run``) and on its
``stage:failed`` / ``step:failed`` events (issue 13, item 12). End to end on memory,
SQLite and PostgreSQL with an in-process worker."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from treadle import (
    Engine,
    RetryPolicy,
    RunStatus,
    StageStatus,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel.errors import MAX_TRACEBACK_CHARS, short_traceback
from treadle.kernel.events import StageFailed, StepFailed
from treadle.testing import FakeClock, TestEngine
from treadle.tests.scenario.helpers import run_events, until_event, until_status, worker


class Num(BaseModel):
    n: int


def ratio_of(n: int) -> float:
    return 100 / (n - n)  # the user's bug: the line a traceback must point at


@define_stage(
    id="ratio", input=Num, output=Num, retry=RetryPolicy(max_attempts=2, initial_delay=0.01)
)
async def ratio(ctx):  # type: ignore[no-untyped-def]
    return Num(n=int(ratio_of(ctx.input.n)))


@define_stage(id="ratio-sync", input=Num, output=Num, retry=RetryPolicy(max_attempts=1))
def ratio_sync(ctx):  # type: ignore[no-untyped-def]
    try:
        return Num(n=int(ratio_of(ctx.input.n)))
    except ZeroDivisionError as exc:
        raise ValueError("could not compute the ratio") from exc


def charge(n: int) -> int:
    raise ConnectionError(f"card {n} declined")


@workflow(id="checkout", input=Num, output=int)
async def checkout(ctx: WorkflowContext, order: Num) -> int:
    charged: int = await ctx.step(
        "charge", charge, order.n, retry=RetryPolicy(max_attempts=2, initial_delay=0.01)
    )
    return charged


PIPE = WorkflowBuilder("ratio-wf", input=Num).pipe(ratio).build()
SYNC = WorkflowBuilder("ratio-sync-wf", input=Num).pipe(ratio_sync).build()
WORKFLOWS = [PIPE, SYNC, checkout]

_ENGINE_PATHS = ("treadle/kernel", "/kernel/", "/runtime/", "/asyncio/", "concurrent/futures")


def _frames(trace: str) -> list[str]:
    return [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]


def _assert_user_frames_only(trace: str | None) -> str:
    assert trace is not None
    frames = _frames(trace)
    assert frames, trace
    for frame in frames:
        assert __file__ in frame, f"an engine frame was kept: {frame}"
        assert not any(path in frame for path in _ENGINE_PATHS), frame
    return trace


async def _fail_twice(engine: Engine, clock: FakeClock, run_id: str, kind: str) -> None:
    """Run until the first failed attempt, move the fake clock past its retry delay, and
    run until the run failed for good."""
    async with worker(engine):
        await until_event(engine, run_id, kind)
        clock.advance(1)
        await until_status(engine, run_id, RunStatus.FAILED)


async def test_failed_stage_keeps_its_shortened_traceback(engine: Engine, clock: FakeClock) -> None:
    """The stage's last failure, through ``get_run``, carries a traceback through the
    stage body and the helper it called, down to the failing line; the engine's frames
    are gone. Each failed attempt's ``stage:failed`` carries it too."""
    handle = await engine.start("ratio-wf", {"n": 3})
    await _fail_twice(engine, clock, handle.run_id, "stage:failed")
    run = await engine.get_run(handle.run_id)
    [stage] = run.stages
    assert stage.status is StageStatus.FAILED
    assert stage.error == "ZeroDivisionError: division by zero"
    trace = _assert_user_frames_only(stage.error_traceback)
    assert "in ratio\n" in trace
    assert "in ratio_of\n" in trace
    assert "return 100 / (n - n)" in trace
    assert trace.rstrip().endswith("ZeroDivisionError: division by zero")
    failures = [e for e in await run_events(engine, handle.run_id) if isinstance(e, StageFailed)]
    assert [f.will_retry for f in failures] == [True, False]
    for failure in failures:
        assert failure.traceback == trace


async def test_sync_stage_traceback_keeps_the_chained_cause(engine: Engine) -> None:
    """A sync stage (run in a thread) that wraps the error keeps both tracebacks,
    joined as Python prints them, without the thread pool's frames."""
    handle = await engine.start("ratio-sync-wf", {"n": 3})
    async with worker(engine):
        await until_status(engine, handle.run_id, RunStatus.FAILED)
    [stage] = (await engine.get_run(handle.run_id)).stages
    trace = _assert_user_frames_only(stage.error_traceback)
    assert "ZeroDivisionError: division by zero" in trace
    assert "The above exception was the direct cause of the following exception" in trace
    assert trace.rstrip().endswith("ValueError: could not compute the ratio")
    assert "threading.py" not in trace


async def test_failed_step_keeps_its_traceback(engine: Engine, clock: FakeClock) -> None:
    """Each failed attempt of a code workflow's step has the step function's traceback on
    its ``step:failed``; the run's workflow stage keeps the body's, whose cause is the
    step's error."""
    handle = await engine.start("checkout", {"n": 42})
    await _fail_twice(engine, clock, handle.run_id, "step:failed")
    events = await run_events(engine, handle.run_id)
    failures = [e for e in events if isinstance(e, StepFailed)]
    assert [f.attempt for f in failures] == [1, 2]
    for failure in failures:
        trace = _assert_user_frames_only(failure.traceback)
        assert "in charge\n" in trace
        assert trace.rstrip().endswith("ConnectionError: card 42 declined")
    [stage] = (await engine.get_run(handle.run_id)).stages
    trace = _assert_user_frames_only(stage.error_traceback)
    assert "in checkout\n" in trace
    assert "StepFailedError" in trace


async def test_a_retried_stage_that_succeeds_keeps_no_traceback() -> None:
    """The traceback belongs to the failed attempt: the next attempt's start clears it
    with the error, so a stage that recovered shows neither."""
    calls: list[int] = []

    @define_stage(id="flaky", input=Num, output=Num, retry=RetryPolicy(initial_delay=1.0))
    async def flaky(ctx):  # type: ignore[no-untyped-def]
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            ratio_of(1)
        return ctx.input

    te = TestEngine([WorkflowBuilder("flaky-wf", input=Num).pipe(flaky).build()])
    handle = await te.start("flaky-wf", {"n": 1})
    await te.run_until_idle()
    [pending] = (await te.get_run(handle.run_id)).stages
    assert pending.error_traceback is not None
    await te.advance_time(2)
    [stage] = (await te.get_run(handle.run_id)).stages
    assert (stage.status, stage.error, stage.error_traceback) == (
        StageStatus.COMPLETED,
        None,
        None,
    )


async def test_treadles_own_errors_have_no_traceback() -> None:
    """An error Treadle raises itself (an output that does not match its model) has no
    user frame to show: the message says it all, and no traceback is stored."""

    @define_stage(id="wrong", input=Num, output=Num, retry=RetryPolicy(max_attempts=1))
    async def wrong(ctx):  # type: ignore[no-untyped-def]
        return {"n": "not a number"}

    te = TestEngine([WorkflowBuilder("wrong-wf", input=Num).pipe(wrong).build()])
    handle = await te.start("wrong-wf", {"n": 1})
    await te.run_until_idle()
    [stage] = (await te.get_run(handle.run_id)).stages
    assert stage.status is StageStatus.FAILED
    assert stage.error is not None
    assert stage.error_traceback is None


def _recurse(n: int) -> int:
    return _recurse(n + 1) + 1


def test_traceback_is_bounded() -> None:
    """A deep recursion keeps only the innermost frames and at most
    ``MAX_TRACEBACK_CHARS`` characters, ending with the error."""
    try:
        _recurse(0)
    except RecursionError as exc:
        trace = short_traceback(exc)
    assert trace is not None
    assert len(trace) <= MAX_TRACEBACK_CHARS + 40
    assert trace.rstrip().endswith("RecursionError: maximum recursion depth exceeded")
    assert len(_frames(trace)) <= 30


def test_long_messages_are_cut_from_the_front() -> None:
    """A traceback longer than the bound keeps its end (where the error is) and says how
    much was cut."""
    try:
        raise ValueError("x" * (MAX_TRACEBACK_CHARS * 2))
    except ValueError as exc:
        trace = short_traceback(exc)
    assert trace is not None
    assert trace.startswith("... (")
    assert "characters cut)" in trace.splitlines()[0]
    assert len(trace) <= MAX_TRACEBACK_CHARS + 40


@pytest.mark.parametrize("exc", [ValueError("never raised"), KeyError("k")])
def test_an_exception_never_raised_has_no_traceback(exc: Exception) -> None:
    """An exception object with no frames (made, not raised) gives ``None``."""
    assert short_traceback(exc) is None
