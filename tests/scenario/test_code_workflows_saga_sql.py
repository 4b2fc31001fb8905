"""Sagas and execution timeouts through ``Engine.open`` on every backend: memory, a
SQLite file and PostgreSQL (a database per test). The kernel commands a worker and the
maintenance tick would send are dispatched one by one on a ``FakeClock``, so each
test decides exactly when a job runs, crashes or falls due."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, RetryPolicy, RunStatus, WorkflowContext, workflow
from treadle.kernel import commands as c
from treadle.kernel.model import StageStatus
from treadle.testing import FakeClock, SimulatedCrash

ONCE = RetryPolicy(max_attempts=1)


class Trip(BaseModel):
    fail_at: str = ""


DONE: list[str] = []
CRASHES: list[str] = []


def book(what: str, trip: Trip) -> str:
    if trip.fail_at == what:
        raise RuntimeError(f"{what} unavailable")
    DONE.append(what)
    return f"{what}-ok"


def undo(what: str) -> None:
    if what in CRASHES:
        CRASHES.remove(what)
        raise SimulatedCrash
    DONE.append(f"undo {what}")


@workflow(id="trip", input=Trip, output=str, execution_timeout=timedelta(hours=1))
async def trip(ctx: WorkflowContext, order: Trip) -> str:
    saga = ctx.saga()
    for what in ("flight", "hotel", "car"):
        await ctx.step(what, book, what, order, retry=ONCE)
        saga.add(f"cancel-{what}", undo, what)
    await ctx.wait_for_signal("go", timeout=timedelta(days=1))
    return "booked"


WORKFLOWS = [trip]


@pytest.fixture(autouse=True)
def _reset() -> None:
    DONE.clear()
    CRASHES.clear()


async def _drain(engine: Engine, clock: FakeClock, worker: str = "w1") -> int:
    """Execute every job due now, as a worker would; returns how many ran."""
    kernel = engine.kernel
    ran = 0
    while jobs := await kernel.deps.job_transport.dequeue(worker, clock.now()):
        for job in jobs:
            await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id=worker))
            ran += 1
    return ran


async def _start(engine: Engine, clock: FakeClock, fail_at: str = "") -> str:
    handle = await engine.start("trip", {"fail_at": fail_at})
    await engine.kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    await _drain(engine, clock)
    return handle.run_id


def _compensate_names(journal: list[Any]) -> list[tuple[str, int]]:
    return [(e.name, e.attempts) for e in journal if e.kind == "compensate"]


# -- tests -----------------------------------------------------------------------------------
async def test_failure_compensates_newest_first_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """A step failing for good: the registered compensations run newest first, journaled,
    and the run FAILS with the outcome; saga:compensated is stored with it."""
    run_id = await _start(engine, clock, fail_at="car")
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.FAILED
    assert (run.error or "").endswith("compensated cancel-hotel, cancel-flight")
    assert DONE == ["flight", "hotel", "undo hotel", "undo flight"]
    journal = await engine.journal(run_id)
    assert _compensate_names(journal) == [
        ("compensate:cancel-hotel", 1),
        ("compensate:cancel-flight", 1),
    ]
    events = [e async for e in engine.events(run_id)]  # type: ignore[attr-defined]
    (saga,) = [e for e in events if e.type == "saga:compensated"]
    assert (saga.trigger, saga.compensated) == ("failed", ["cancel-hotel", "cancel-flight"])


async def test_cancel_then_crash_during_compensation_resumes_exactly_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """run.cancel ends the run at once and queues the compensating activation; it dies in
    the middle compensation, and once its lease is reaped the next one finishes the rest
    without repeating the compensation that had committed."""
    kernel = engine.kernel
    run_id = await _start(engine, clock)
    assert (await engine.get_run(run_id)).status is RunStatus.SUSPENDED
    assert await engine.cancel(run_id, reason="changed plans")
    assert (await engine.get_run(run_id)).status is RunStatus.CANCELLED
    CRASHES.append("hotel")
    (job,) = await kernel.deps.job_transport.dequeue("w1", clock.now())
    with pytest.raises(SimulatedCrash):
        await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))
    assert DONE == ["flight", "hotel", "car", "undo car"]
    clock.advance(timedelta(minutes=5))
    reaped = await kernel.dispatch(c.LeaseReapStale(stale_threshold=timedelta(seconds=60)))
    assert reaped.released == 1
    clock.advance(timedelta(minutes=5))  # past the release backoff
    assert await _drain(engine, clock, worker="w2") == 1
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error == "changed plans; compensated cancel-car, cancel-hotel, cancel-flight"
    assert [s.status for s in run.stages] == [StageStatus.CANCELLED]
    assert DONE == ["flight", "hotel", "car", "undo car", "undo hotel", "undo flight"]
    assert _compensate_names(await engine.journal(run_id)) == [
        ("compensate:cancel-car", 1),
        ("compensate:cancel-hotel", 1),
        ("compensate:cancel-flight", 1),
    ]


async def test_execution_timeout_cancels_and_compensates_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """A run still waiting at started_at + execution_timeout is cancelled by the tick's
    poll ('execution timeout'), compensated, and left CANCELLED; before the deadline the
    poll does nothing."""
    kernel = engine.kernel
    run_id = await _start(engine, clock)
    clock.advance(timedelta(minutes=59))
    early = await kernel.dispatch(c.StagePollSuspended())
    assert early.timed_out_workflow_run_ids == []
    clock.advance(timedelta(minutes=1))
    polled = await kernel.dispatch(c.StagePollSuspended())
    assert polled.timed_out_workflow_run_ids == [run_id]
    assert await _drain(engine, clock) == 1
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error == "execution timeout; compensated cancel-car, cancel-hotel, cancel-flight"
    again = await kernel.dispatch(c.StagePollSuspended())
    assert again.timed_out_workflow_run_ids == []  # the timer fired once


async def test_per_run_execution_timeout_overrides_the_workflow_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """A run started with its own execution_timeout is cancelled at its start plus that
    timeout, before the workflow's own hour has passed."""
    kernel = engine.kernel
    handle = await engine.start("trip", {}, execution_timeout=timedelta(minutes=5))
    clock.advance(timedelta(minutes=2))  # waits in the queue; the clock starts at claim
    await kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    await _drain(engine, clock)
    clock.advance(timedelta(minutes=4, seconds=59))
    assert (await kernel.dispatch(c.StagePollSuspended())).timed_out_workflow_run_ids == []
    clock.advance(timedelta(seconds=1))
    polled = await kernel.dispatch(c.StagePollSuspended())
    assert polled.timed_out_workflow_run_ids == [handle.run_id]
    await _drain(engine, clock)
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert (run.error or "").startswith("execution timeout; compensated cancel-car")


async def test_result_of_a_cancelled_run_waits_for_its_compensations_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """handle.result() does not answer while a cancelled run is still compensating (the
    run is CANCELLED but its orchestrating stage is live); once the compensations have
    run it raises RunCancelledError naming their outcome."""
    from treadle.kernel.errors import RunCancelledError

    run_id = await _start(engine, clock)
    assert await engine.cancel(run_id, reason="changed plans")
    handle = engine.handle(run_id)
    with pytest.raises(TimeoutError, match="CANCELLED and compensating"):
        await handle.result(timeout=0.05)
    assert await _drain(engine, clock) == 1
    with pytest.raises(RunCancelledError, match="compensated cancel-car, cancel-hotel"):
        await handle.result(timeout=5)
