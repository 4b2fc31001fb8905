"""Sagas and execution timeouts of code workflows on the TestEngine (DESIGN §3.2
``saga()``, issue 5 requirements 7 and 9): compensations newest first on failure and
on cancel, each a durable step; a failing compensation; exact resume after a crash
during compensation; an execution timeout cancelling a step in flight."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, RunStatus, StepFailedError, WorkflowContext, workflow
from treadle.kernel import commands as c
from treadle.kernel.errors import DefinitionError, NonDeterminismError, RunCancelledError
from treadle.kernel.events import SagaCompensated
from treadle.kernel.kernel import KernelSettings
from treadle.kernel.model import JobStatus, StageStatus
from treadle.kernel.workflows import WORKFLOW_STAGE_ID, JournalStatus
from treadle.testing import SimulatedCrash, TestEngine

ONCE = RetryPolicy(max_attempts=1)


class Trip(BaseModel):
    fail_at: str = ""


DONE: list[str] = []
"""Forward steps and compensations in the order they really ran."""


@pytest.fixture(autouse=True)
def _reset() -> None:
    DONE.clear()


def book(what: str, trip: Trip) -> str:
    if trip.fail_at == what:
        raise RuntimeError(f"{what} unavailable")
    DONE.append(what)
    return f"{what}-ok"


def undo(what: str) -> None:
    DONE.append(f"undo {what}")


@workflow(id="trip", input=Trip, output=list[str])
async def trip(ctx: WorkflowContext, order: Trip) -> list[str]:
    saga = ctx.saga()
    booked = []
    for what in ("flight", "hotel", "car"):
        booked.append(await ctx.step(what, book, what, order, retry=ONCE))
        saga.add(f"cancel-{what}", undo, what)
    await ctx.wait_for_signal("go")
    booked.append(await ctx.step("pay", book, "pay", order, retry=ONCE))
    return booked


def _saga_events(te: TestEngine) -> list[SagaCompensated]:
    return [e for e in te.events if isinstance(e, SagaCompensated)]


async def test_compensations_run_newest_first_when_a_step_fails_for_good() -> None:
    """A step failing for good: the compensations registered so far run in reverse order,
    each journaled as a step, and the run FAILS with the outcome in its error."""
    te = TestEngine([trip])
    handle = await te.start("trip", {"fail_at": "car"})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert DONE == ["flight", "hotel", "undo hotel", "undo flight"]
    assert run.error is not None
    assert "step 'car' #1 failed" in run.error
    assert run.error.endswith("compensated cancel-hotel, cancel-flight")
    journal = await te.journal(handle.run_id)
    assert [(e.kind, e.name) for e in journal] == [
        ("step", "flight"),
        ("compensation", "compensation:cancel-flight"),
        ("step", "hotel"),
        ("compensation", "compensation:cancel-hotel"),
        ("step", "car"),
        ("compensate", "compensate:cancel-hotel"),
        ("compensate", "compensate:cancel-flight"),
    ]
    assert journal[-1].status is JournalStatus.COMPLETED
    (event,) = _saga_events(te)
    assert (event.trigger, event.compensated, event.failed) == (
        "failed",
        ["cancel-hotel", "cancel-flight"],
        {},
    )
    types = [e.type for e in te.events]
    assert types.index("saga:compensated") < types.index("workflow:failed")


async def test_cancel_ends_the_run_at_once_then_runs_its_compensations() -> None:
    """run.cancel makes the run CANCELLED immediately (no forward step can commit); a
    compensating activation then undoes every booking newest first and the stage ends
    CANCELLED, the outcome appended to the cancel reason."""
    te = TestEngine([trip])
    handle = await te.start("trip", {})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    assert await te.cancel(handle.run_id, reason="customer changed plans")
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert DONE == ["flight", "hotel", "car"]
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert DONE == ["flight", "hotel", "car", "undo car", "undo hotel", "undo flight"]
    assert run.error == (
        "customer changed plans; compensated cancel-car, cancel-hotel, cancel-flight"
    )
    stage = next(s for s in run.stages if s.stage_id == WORKFLOW_STAGE_ID)
    assert stage.status is StageStatus.CANCELLED
    (event,) = _saga_events(te)
    assert event.trigger == "cancelled"
    with pytest.raises(RunCancelledError):
        await handle.result()
    await te.advance_time(timedelta(days=1))  # nothing left: compensations ran once
    assert DONE.count("undo car") == 1
    assert not await te.cancel(handle.run_id)  # a second cancel changes nothing


async def test_cancel_while_a_step_is_in_flight_signals_it_and_discards_its_result() -> None:
    """A cancel during a step: the step sees ctx.cancelled, its result is discarded (it
    never succeeded, so it is not compensated) and the earlier steps are undone."""
    started = asyncio.Event()
    seen: list[bool] = []

    async def slow(_: str) -> str:
        info = WorkflowContext.current_step()
        assert info is not None
        started.set()
        await info.cancelled.wait()
        seen.append(bool(info.cancelled))
        return "late"

    @workflow(id="slowtrip", input=Trip, output=str)
    async def slowtrip(ctx: WorkflowContext, order: Trip) -> str:
        saga = ctx.saga()
        await ctx.step("flight", book, "flight", order)
        saga.add("cancel-flight", undo, "flight")
        return str(await ctx.step("hotel", slow, "hotel"))

    te = TestEngine([slowtrip])
    handle = await te.start("slowtrip", {})
    driver = asyncio.create_task(te.run_until_idle())
    await started.wait()
    assert await te.cancel(handle.run_id, reason="stop")
    await driver
    await te.run_until_idle()
    assert seen == [True]
    assert DONE == ["flight", "undo flight"]
    run = await te.get_run(handle.run_id)
    assert (run.status, run.error) == (RunStatus.CANCELLED, "stop; compensated cancel-flight")
    assert "hotel" not in [e.name for e in await te.journal(handle.run_id)]


async def test_a_compensation_failing_for_good_does_not_stop_the_others() -> None:
    """Each compensation gets its turn: one failing for good (after its retries) is
    recorded with its error, and the older ones still run."""
    attempts: list[int] = []

    def broken_undo(what: str) -> None:
        info = WorkflowContext.current_step()
        attempts.append(info.attempt if info else 0)
        raise ConnectionError(f"cannot undo {what}")

    @workflow(id="partial", input=Trip, output=str)
    async def partial(ctx: WorkflowContext, order: Trip) -> str:
        saga = ctx.saga()
        await ctx.step("flight", book, "flight", order)
        saga.add("cancel-flight", undo, "flight")
        await ctx.step("hotel", book, "hotel", order)
        saga.add("cancel-hotel", broken_undo, "hotel", retry=RetryPolicy(max_attempts=2))
        await ctx.step("car", book, "car", order, retry=ONCE)
        return "booked"

    te = TestEngine([partial])
    handle = await te.start("partial", {"fail_at": "car"})
    await te.advance_time(timedelta(minutes=5))  # the compensation's retry backoff
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert attempts == [1, 2]
    assert DONE == ["flight", "hotel", "undo flight"]
    assert run.error is not None
    assert run.error.endswith(
        "; compensated cancel-flight; "
        "compensation failed: cancel-hotel (ConnectionError: cannot undo hotel)"
    )
    (event,) = _saga_events(te)
    assert event.compensated == ["cancel-flight"]
    assert event.failed == {"cancel-hotel": "ConnectionError: cannot undo hotel"}


async def test_crash_during_compensation_resumes_exactly() -> None:
    """A worker dying in the middle compensation: on resume the finished compensation is
    not run again, the interrupted one runs once more, the rest once; the run FAILS."""
    calls: list[str] = []

    def crashing_undo(what: str) -> None:
        calls.append(what)
        if calls.count(what) == 1:
            raise SimulatedCrash
        DONE.append(f"undo {what}")

    @workflow(id="crashtrip", input=Trip, output=str)
    async def crashtrip(ctx: WorkflowContext, order: Trip) -> str:
        saga = ctx.saga()
        for what in ("flight", "hotel", "car"):
            await ctx.step(what, book, what, order, retry=ONCE)
            saga.add(f"cancel-{what}", crashing_undo if what == "hotel" else undo, what)
        await ctx.step("pay", book, "pay", order, retry=ONCE)
        return "paid"

    te = TestEngine([crashtrip])
    handle = await te.start("crashtrip", {"fail_at": "pay"})
    with pytest.raises(SimulatedCrash):
        await te.run_until_idle()
    assert DONE == ["flight", "hotel", "car", "undo car"]
    await te.advance_time(timedelta(minutes=1))  # lease reaped, activation replayed
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert DONE == ["flight", "hotel", "car", "undo car", "undo hotel", "undo flight"]
    assert calls == ["hotel", "hotel"]
    compensations = [
        (e.name, e.attempts) for e in await te.journal(handle.run_id) if e.kind == "compensate"
    ]
    assert compensations == [
        ("compensate:cancel-car", 1),
        ("compensate:cancel-hotel", 1),
        ("compensate:cancel-flight", 1),
    ]
    assert len(_saga_events(te)) == 1


async def test_a_body_catching_a_failure_is_not_compensated() -> None:
    """Compensations run only when the body raises out: a StepFailedError it catches and
    handles leaves the registered compensations alone and the run completes."""

    @workflow(id="tolerant", input=Trip, output=str)
    async def tolerant(ctx: WorkflowContext, order: Trip) -> str:
        saga = ctx.saga()
        await ctx.step("flight", book, "flight", order)
        saga.add("cancel-flight", undo, "flight")
        try:
            await ctx.step("hotel", book, "hotel", order, retry=ONCE)
        except StepFailedError:
            return "flight only"
        return "both"

    te = TestEngine([tolerant])
    handle = await te.start("tolerant", {"fail_at": "hotel"})
    assert await handle.result() == "flight only"
    assert DONE == ["flight"]
    assert _saga_events(te) == []


async def test_registrations_are_checked_on_replay() -> None:
    """saga.add is journaled: a replay registering another compensation at that point
    fails the run with NonDeterminismError naming both."""
    names = iter(["cancel-a", "cancel-b"])

    @workflow(id="fickle", input=Trip, output=str)
    async def fickle(ctx: WorkflowContext, order: Trip) -> str:
        ctx.saga().add(next(names), undo, "x")
        await ctx.sleep(timedelta(minutes=1))
        return "done"

    te = TestEngine([fickle], settings=KernelSettings(sticky_execution=False))  # replays
    handle = await te.start("fickle", {})
    await te.advance_time(timedelta(minutes=2))
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert NonDeterminismError.__name__ in run.error
    assert "compensation 'cancel-b' #1" in run.error


async def test_a_run_without_saga_still_cancels_exactly_as_before() -> None:
    """No compensations registered: run and stage are CANCELLED at once, no job is
    left, nothing replays and no saga event is recorded."""

    @workflow(id="plain", input=Trip, output=str)
    async def plain(ctx: WorkflowContext, order: Trip) -> str:
        await ctx.step("flight", book, "flight", order)
        await ctx.wait_for_signal("go")
        return "done"

    te = TestEngine([plain])
    handle = await te.start("plain", {})
    await te.run_until_idle()
    assert await te.cancel(handle.run_id, reason="bye")
    run = await te.get_run(handle.run_id)
    assert (run.status, run.error) == (RunStatus.CANCELLED, "bye")
    assert [s.status for s in run.stages] == [StageStatus.CANCELLED]
    live = [j for j in te.job_transport.jobs.values() if j.status is JobStatus.QUEUED]
    assert live == []
    await te.advance_time(timedelta(days=1))
    assert (await te.get_run(handle.run_id)).error == "bye"
    assert _saga_events(te) == []
    assert DONE == ["flight"]


# -- execution timeout ---------------------------------------------------------------------
async def test_execution_timeout_cancels_the_step_in_flight_and_compensates() -> None:
    """At the deadline the maintenance tick cancels the run with reason 'execution
    timeout': the step in flight sees ctx.cancelled, its result is discarded, the
    compensations run, and the run ends CANCELLED."""
    started = asyncio.Event()
    seen: list[str | None] = []

    async def slow(_: str) -> str:
        info = WorkflowContext.current_step()
        assert info is not None
        started.set()
        await info.cancelled.wait()
        seen.append(info.cancelled.reason)
        return "late"

    @workflow(id="capped", input=Trip, output=str, execution_timeout=timedelta(minutes=10))
    async def capped(ctx: WorkflowContext, order: Trip) -> str:
        saga = ctx.saga()
        await ctx.step("flight", book, "flight", order)
        saga.add("cancel-flight", undo, "flight")
        return str(await ctx.step("hotel", slow, "hotel"))

    te = TestEngine([capped])
    handle = await te.start("capped", {})
    driver = asyncio.create_task(te.run_until_idle())
    await started.wait()
    te.clock.advance(timedelta(minutes=9))
    early = await te.dispatch(c.StagePollSuspended(max_checks=10))
    assert early.timed_out_workflow_run_ids == []
    te.clock.advance(timedelta(minutes=1))
    polled = await te.dispatch(c.StagePollSuspended(max_checks=10))  # the tick's poll step
    assert polled.timed_out_workflow_run_ids == [handle.run_id]
    await driver
    await te.run_until_idle()
    assert seen == ["execution timeout"]
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error == "execution timeout; compensated cancel-flight"
    assert DONE == ["flight", "undo flight"]
    cancelled = [e for e in te.events if e.type == "workflow:cancelled"]
    assert [e.reason for e in cancelled] == ["execution timeout"]  # type: ignore[attr-defined]


async def test_execution_timeout_of_a_sleeping_run_and_one_that_finishes_in_time() -> None:
    """A run suspended past its deadline is cancelled by the timer (its sleep never ends);
    a run finishing before its deadline is untouched when the deadline passes."""

    @workflow(id="sleeper", input=Trip, output=str, execution_timeout=3600)
    async def sleeper(ctx: WorkflowContext, order: Trip) -> str:
        await ctx.step("flight", book, "flight", order)
        if order.fail_at != "quick":
            await ctx.sleep(timedelta(days=1))
        return "woke"

    te = TestEngine([sleeper])
    slow = await te.start("sleeper", {})
    quick = await te.start("sleeper", {"fail_at": "quick"})
    await te.advance_time(timedelta(hours=2))
    run = await te.get_run(slow.run_id)
    assert (run.status, run.error) == (RunStatus.CANCELLED, "execution timeout")
    assert run.completed_at == run.started_at + timedelta(hours=1)  # type: ignore[operator]
    assert await quick.result() == "woke"
    await te.advance_time(timedelta(days=2))
    assert (await te.get_run(slow.run_id)).status is RunStatus.CANCELLED
    assert [e.kind for e in await te.journal(slow.run_id)] == ["step", "sleep"]


@pytest.mark.parametrize("bad", [0, -5, timedelta(0), "1h", True])
def test_execution_timeout_must_be_positive(bad: Any) -> None:
    """A zero, negative or non-duration execution_timeout is refused at definition time,
    naming the workflow and the option."""
    with pytest.raises(DefinitionError, match=r"workflow 'bad': execution_timeout must be"):

        @workflow(id="bad", input=Trip, execution_timeout=bad)
        async def bad_wf(ctx: WorkflowContext, order: Trip) -> None:
            return None


async def test_saga_add_rejects_bad_arguments() -> None:
    """saga.add with a non-callable fails the run with a clear TypeError naming it."""

    @workflow(id="sloppy", input=Trip, output=str)
    async def sloppy(ctx: WorkflowContext, order: Trip) -> str:
        ctx.saga().add("cancel-x", "not a function")  # type: ignore[arg-type]
        return "never"

    te = TestEngine([sloppy])
    handle = await te.start("sloppy", {})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "saga.add('cancel-x'): fn must be callable" in (run.error or "")


async def test_a_cancel_landing_before_a_registration_was_committed_still_compensates() -> None:
    """A cancel between a step's commit and the body's next boundary (the registration
    still uncommitted): the activation, now a ghost, commits the registration and queues
    the compensating activation, so the step is undone all the same."""
    te = TestEngine()
    run_ids: list[str] = []

    @workflow(id="racy", input=Trip, output=str)
    async def racy(ctx: WorkflowContext, order: Trip) -> str:
        await ctx.step("flight", book, "flight", order)
        ctx.saga().add("cancel-flight", undo, "flight")
        if not ctx.is_replaying and not ctx.compensating:
            await te.cancel(run_ids[0], reason="raced")  # lands before the next commit
        await ctx.sleep(timedelta(hours=1))
        return "done"

    te.register(racy)
    handle = await te.start("racy", {})
    run_ids.append(handle.run_id)
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert (run.status, run.error) == (RunStatus.CANCELLED, "raced; compensated cancel-flight")
    assert DONE == ["flight", "undo flight"]
    kinds = [e.kind for e in await te.journal(handle.run_id)]
    assert kinds == ["step", "compensation", "compensate"]


async def test_cancel_while_failure_compensations_back_off_finishes_them_once() -> None:
    """A run cancelled while its failure compensations wait out a retry backoff: the
    compensating activation picks up where they stopped, none runs twice, and the run
    ends CANCELLED with the outcome."""
    tries: list[int] = []

    def flaky_undo(what: str) -> None:
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("busy")
        DONE.append(f"undo {what}")

    slow_retry = RetryPolicy(
        max_attempts=3, initial_delay=timedelta(minutes=10), max_delay=timedelta(minutes=10)
    )

    @workflow(id="backoff", input=Trip, output=str)
    async def backoff(ctx: WorkflowContext, order: Trip) -> str:
        saga = ctx.saga()
        await ctx.step("flight", book, "flight", order)
        saga.add("cancel-flight", undo, "flight")
        await ctx.step("hotel", book, "hotel", order)
        saga.add("cancel-hotel", flaky_undo, "hotel", retry=slow_retry)
        await ctx.step("car", book, "car", order, retry=ONCE)
        return "booked"

    te = TestEngine([backoff])
    handle = await te.start("backoff", {"fail_at": "car"})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED  # backing off
    assert await te.cancel(handle.run_id, reason="stop")
    await te.advance_time(timedelta(hours=1))
    run = await te.get_run(handle.run_id)
    assert (run.status, run.error) == (
        RunStatus.CANCELLED,
        "stop; compensated cancel-hotel, cancel-flight",
    )
    assert DONE == ["flight", "hotel", "undo hotel", "undo flight"]
    assert len(tries) == 2
    (event,) = _saga_events(te)
    assert event.trigger == "cancelled"


async def test_a_compensating_replay_that_diverges_cannot_compensate() -> None:
    """If the cancelled run's body no longer replays its journal, nothing can be undone
    safely: the run stays CANCELLED, its stage ends, and the reason says why."""
    names = iter(["flight", "train"])

    @workflow(id="drifting", input=Trip, output=str)
    async def drifting(ctx: WorkflowContext, order: Trip) -> str:
        what = next(names)
        await ctx.step(what, book, what, order)
        ctx.saga().add(f"cancel-{what}", undo, what)
        await ctx.wait_for_signal("go")
        return "done"

    te = TestEngine([drifting])
    handle = await te.start("drifting", {})
    await te.run_until_idle()
    assert await te.cancel(handle.run_id, reason="stop")
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert (run.error or "").startswith("stop; not compensated: NonDeterminismError")
    assert [s.status for s in run.stages] == [StageStatus.CANCELLED]
    assert DONE == ["flight"]


async def test_a_compensation_registered_in_a_loop_is_told_apart_by_its_order() -> None:
    """The same compensation name registered per item runs once per registration, newest
    first, labelled name#k by registration order in the outcome."""

    @workflow(id="rooms", input=Trip, output=str)
    async def rooms(ctx: WorkflowContext, order: Trip) -> str:
        saga = ctx.saga()
        for room in ("101", "102"):
            await ctx.step("reserve", book, room, order)
            saga.add("release", undo, room, timeout=timedelta(seconds=30))
        await ctx.step("pay", book, "pay", order, retry=ONCE)
        return "paid"

    te = TestEngine([rooms])
    handle = await te.start("rooms", {"fail_at": "pay"})
    await te.run_until_idle()
    assert DONE == ["101", "102", "undo 102", "undo 101"]
    (event,) = _saga_events(te)
    assert event.compensated == ["release#2", "release#1"]
    journal = await te.journal(handle.run_id)
    assert [(e.name, e.occurrence) for e in journal if e.kind == "compensate"] == [
        ("compensate:release", 1),
        ("compensate:release", 2),
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry": 3}, "retry must be a RetryPolicy"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"timeout": timedelta(seconds=-1)}, "timeout must be positive"),
    ],
)
async def test_saga_add_rejects_bad_options(options: dict[str, Any], message: str) -> None:
    """A bad retry or timeout given to saga.add fails the run naming the option."""

    @workflow(id="badopts", input=Trip, output=str)
    async def badopts(ctx: WorkflowContext, order: Trip) -> str:
        ctx.saga().add("cancel-x", undo, "x", **options)
        return "never"

    te = TestEngine([badopts])
    handle = await te.start("badopts", {})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert f"saga.add('cancel-x'): {message}" in (run.error or "")


async def test_a_run_can_carry_its_own_execution_timeout_counted_from_its_start() -> None:
    """engine.start(execution_timeout=...) caps that run (overriding the workflow), from
    when it is claimed, not created; other runs of the workflow are not capped."""

    @workflow(id="napper", input=Trip, output=str)
    async def napper(ctx: WorkflowContext, order: Trip) -> str:
        await ctx.sleep(timedelta(hours=3))
        return "rested"

    te = TestEngine([napper])
    capped = await te.start("napper", {}, execution_timeout=timedelta(minutes=30))
    free = await te.start("napper", {})
    te.clock.advance(timedelta(minutes=10))  # queued, not started yet
    await te.advance_time(timedelta(hours=4))
    run = await te.get_run(capped.run_id)
    assert (run.status, run.error) == (RunStatus.CANCELLED, "execution timeout")
    assert run.started_at is not None
    assert run.started_at - run.created_at == timedelta(minutes=10)
    assert run.completed_at == run.started_at + timedelta(minutes=30)
    assert await free.result() == "rested"


async def test_a_bad_per_run_execution_timeout_is_refused_before_anything_is_written() -> None:
    """Engine.start refuses a zero or negative execution_timeout naming the argument, and
    a pipeline refuses the option; no run is created either way."""
    from treadle import Engine, WorkflowBuilder, define_stage
    from treadle.kernel.errors import NotSupportedError, TreadleValidationError

    @define_stage(id="echo", input=Trip, output=Trip)
    async def echo(ctx: Any) -> Trip:
        return ctx.input  # type: ignore[no-any-return]

    pipeline = WorkflowBuilder("pipe", input=Trip).pipe(echo).build()
    async with await Engine.open("memory://", workflows=[trip, pipeline]) as engine:
        for bad in (0, -1, timedelta(0)):
            with pytest.raises(TreadleValidationError, match="execution_timeout"):
                await engine.start("trip", {}, execution_timeout=bad)
        with pytest.raises(NotSupportedError, match="execution_timeout"):
            await engine.start("pipe", {}, execution_timeout=60)
        assert await engine.list() == []
