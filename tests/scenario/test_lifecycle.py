"""Pause, resume and terminate (``run.pause``, ``run.resume``, ``run.terminate``) on
every backend, for stage pipelines and code workflows. The tests drive the kernel
step by step (the production maintenance tick, then the queued jobs) on a FakeClock, so
what runs while a run is paused is exact, not a matter of timing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    Engine,
    RetryPolicy,
    RunStatus,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel import commands as c
from treadle.kernel.errors import InvalidStateError, RunCancelledError
from treadle.kernel.model import JobStatus, StageStatus
from treadle.runtime.tick import maintenance_tick
from treadle.testing import FakeClock
from treadle.tests.scenario.helpers import WAIT, run_events, until, worker

CALLS: list[str] = []
HOOKS: dict[str, Any] = {}
"""stage or step name -> ``async (run_id) -> None`` run inside that body (a pause)."""


class N(BaseModel):
    n: int


async def _hook(name: str, run_id: str) -> None:
    CALLS.append(name)
    hook = HOOKS.pop(name, None)
    if hook is not None:
        await hook(run_id)


@define_stage(id="a", input=N, output=N)
async def stage_a(ctx):  # type: ignore[no-untyped-def]
    await _hook("a", ctx.run_id)
    return N(n=ctx.input.n + 1)


@define_stage(id="b", input=N, output=N)
async def stage_b(ctx):  # type: ignore[no-untyped-def]
    await _hook("b", ctx.run_id)
    return N(n=ctx.input.n * 2)


@define_stage(id="c", input=N, output=N, retry=RetryPolicy(max_attempts=3, initial_delay=60.0))
async def stage_c(ctx):  # type: ignore[no-untyped-def]
    await _hook("c", ctx.run_id)
    if HOOKS.pop("c-fails", False):
        raise ConnectionError("flaky")
    return N(n=ctx.input.n + 100)


PIPE = WorkflowBuilder("pipe", input=N).pipe(stage_a).pipe(stage_b).pipe(stage_c).build()


async def step_one(n: int) -> int:
    await _hook("one", "")
    return n + 1


async def step_two(n: int) -> int:
    await _hook("two", "")
    return n * 10


async def step_three(n: int) -> int:
    await _hook("three", "")
    return n + 5


async def undo(n: int) -> None:
    CALLS.append("undo")


@workflow(id="flow", input=N, output=int, signals={"go": N})
async def flow(ctx: WorkflowContext, order: N) -> int:
    a: int = await ctx.step("one", step_one, order.n)
    b: int = await ctx.step("two", step_two, a)
    await ctx.sleep(timedelta(hours=1))
    got: N = await ctx.wait_for_signal("go", N)
    return int(await ctx.step("three", step_three, b + got.n))


@workflow(id="saga", input=N, output=int, signals={"go": N})
async def saga_flow(ctx: WorkflowContext, order: N) -> int:
    saga = ctx.saga()
    a: int = await ctx.step("one", step_one, order.n)
    saga.add("undo", undo, a)
    got: N = await ctx.wait_for_signal("go", N)
    return a + got.n


WORKFLOWS = [PIPE, flow, saga_flow]


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    HOOKS.clear()


async def drain(engine: Engine, clock: FakeClock) -> None:
    """What workers do at the current time, until nothing moves: the production
    maintenance tick, then every due job, again and again."""
    kernel = engine.kernel
    quiet = 0
    for _ in range(100):
        report = await maintenance_tick(kernel, worker_id="w")
        jobs = await kernel.deps.job_transport.dequeue("w", clock.now(), limit=10)
        for job in jobs:
            await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
        polled = report.steps["poll_suspended"].result or {}
        quiet = 0 if jobs or report.claimed_runs or polled.get("resumed") else quiet + 1
        if quiet == 2:
            return
    pytest.fail("the run never went quiet")


async def types(engine: Engine, run_id: str) -> list[str]:
    return [e.type for e in await run_events(engine, run_id)]  # type: ignore[attr-defined]


def pause_hook(engine: Engine, run_id: list[str]) -> Any:
    async def hook(_: str) -> None:
        assert await engine.pause(run_id[0], reason="maintenance window") is True

    return hook


async def test_pause_lets_the_stage_in_flight_finish_and_starts_no_next(
    engine: Engine, clock: FakeClock
) -> None:
    """Paused inside stage b: b's result is committed, c does not start, however long
    the run waits; resume runs c and completes the run with the right output."""
    handle = await engine.start("pipe", {"n": 1})
    HOOKS["b"] = pause_hook(engine, [handle.run_id])
    await drain(engine, clock)
    run = await engine.get_run(handle.run_id)
    assert run.paused
    assert run.status is RunStatus.RUNNING
    assert {s.stage_id: s.status for s in run.stages} == {
        "a": StageStatus.COMPLETED,
        "b": StageStatus.COMPLETED,
        "c": StageStatus.PENDING,
    }
    clock.advance(timedelta(hours=2))  # the stuck-run reaper must leave it alone too
    await drain(engine, clock)
    assert CALLS == ["a", "b"]
    assert (await engine.get_run(handle.run_id)).status is RunStatus.RUNNING
    assert await engine.resume(handle.run_id) is True
    await drain(engine, clock)
    assert CALLS == ["a", "b", "c"]
    assert await handle.result(timeout=5) == {"n": 104}
    seen = await types(engine, handle.run_id)
    assert seen.index("workflow:paused") < seen.index("workflow:resumed")
    assert not (await engine.get_run(handle.run_id)).paused


async def test_a_paused_pending_run_is_not_claimed(engine: Engine, clock: FakeClock) -> None:
    """A PENDING run paused before any worker claims it stays PENDING; resumed, it runs."""
    handle = await engine.start("pipe", {"n": 0})
    assert await engine.pause(handle.run_id) is True
    assert await engine.pause(handle.run_id) is False  # paused already: nothing changes
    await drain(engine, clock)
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.PENDING
    assert run.paused
    assert CALLS == []
    assert [r.id for r in await engine.list(paused=True)] == [handle.run_id]
    assert await engine.list(paused=False) == []
    assert await engine.resume(handle.run_id) is True
    assert await engine.resume(handle.run_id) is False
    assert await engine.list(paused=True) == []
    await drain(engine, clock)
    assert await handle.result(timeout=5) == {"n": 102}
    assert await engine.list(paused=True) == []


async def test_pause_holds_a_queued_retry_and_resume_keeps_its_backoff(
    engine: Engine, clock: FakeClock
) -> None:
    """A retry waiting in the queue is held while paused (no worker takes it, even when
    due); resumed, it runs, and the attempt it was held at is not counted twice."""
    handle = await engine.start("pipe", {"n": 1})
    HOOKS["c-fails"] = True
    await drain(engine, clock)  # c failed once, its retry is due in 60 s
    assert await engine.pause(handle.run_id) is True
    assert await _live_jobs(engine, handle.run_id) == [JobStatus.SUSPENDED]
    clock.advance(timedelta(minutes=5))
    await drain(engine, clock)
    assert CALLS == ["a", "b", "c"]
    await engine.resume(handle.run_id)
    await drain(engine, clock)
    assert CALLS == ["a", "b", "c", "c"]
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert next(s for s in run.stages if s.stage_id == "c").attempt == 2


async def test_a_job_dequeued_before_the_pause_is_held_not_run(
    engine: Engine, clock: FakeClock
) -> None:
    """A worker that dequeued the next stage just before the pause committed does not
    start it: phase 1 holds the job with its attempt given back, and resume runs it."""
    handle = await engine.start("pipe", {"n": 1})
    kernel = engine.kernel
    await maintenance_tick(kernel, worker_id="w")
    (job,) = await kernel.deps.job_transport.dequeue("w", clock.now())
    assert await engine.pause(handle.run_id)
    result = await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
    assert result.outcome == "suspended"
    assert not result.ghost
    assert CALLS == []
    stage = next(s for s in (await engine.get_run(handle.run_id)).stages if s.stage_id == "a")
    assert stage.status is StageStatus.PENDING
    assert stage.attempt == 0
    await engine.resume(handle.run_id)
    await drain(engine, clock)
    assert await handle.result(timeout=5) == {"n": 104}
    run = await engine.get_run(handle.run_id)
    assert [s.attempt for s in run.stages] == [1, 1, 1]


async def test_pausing_or_resuming_an_ended_run_names_it_and_its_status(
    engine: Engine, clock: FakeClock
) -> None:
    """Pause and resume of a terminal run are refused with the run id and status."""
    handle = await engine.start("pipe", {"n": 1})
    await drain(engine, clock)
    for verb in (engine.pause, engine.resume):
        with pytest.raises(InvalidStateError, match=f"{handle.run_id}.*COMPLETED"):
            await verb(handle.run_id)
    assert await engine.terminate(handle.run_id) is False


async def test_terminate_ends_a_pipeline_at_once(engine: Engine, clock: FakeClock) -> None:
    """Terminated inside stage b: b's result is a ghost, c never runs, the run is
    CANCELLED with ``workflow:terminated`` (and no ``workflow:cancelled``)."""
    handle = await engine.start("pipe", {"n": 1})
    run_id = handle.run_id

    async def terminate(_: str) -> None:
        assert await engine.terminate(run_id, reason="runaway") is True

    HOOKS["b"] = terminate
    await drain(engine, clock)
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.terminated
    assert run.error == "runaway"
    assert [s.status for s in run.stages] == [StageStatus.COMPLETED] + [StageStatus.CANCELLED] * 2
    assert CALLS == ["a", "b"]
    seen = await types(engine, run_id)
    assert "workflow:terminated" in seen
    assert "workflow:cancelled" not in seen


async def test_code_workflow_pause_between_steps_sleep_and_signal(
    engine: Engine, clock: FakeClock
) -> None:
    """Paused inside step one: one is journaled, two does not start. Resumed, the body
    goes on to its sleep; paused again, the sleep's timer due meanwhile does not fire
    and a signal sent meanwhile is stored; resumed, the timer fires, the signal is
    delivered and the run completes."""
    handle = await engine.start("flow", {"n": 1})
    run_id = handle.run_id
    HOOKS["one"] = pause_hook(engine, [run_id])
    await drain(engine, clock)
    assert CALLS == ["one"]
    run = await engine.get_run(run_id)
    assert run.paused
    assert run.status is RunStatus.SUSPENDED
    assert (await run_events(engine, run_id))[-1].waiting_for == "paused"  # type: ignore[attr-defined]
    await engine.resume(run_id)
    await drain(engine, clock)
    assert CALLS == ["one", "two"]  # one was not run again
    assert await engine.pause(run_id)
    clock.advance(timedelta(hours=2))
    await drain(engine, clock)
    await engine.signal(run_id, "go", {"n": 7})
    await drain(engine, clock)
    seen = await types(engine, run_id)
    assert "timer:fired" not in seen
    assert "signal:received" in seen
    assert CALLS == ["one", "two"]
    await engine.resume(run_id)
    await drain(engine, clock)
    assert await handle.result(timeout=5) == 32  # (1 + 1) * 10 + 7 + 5
    seen = await types(engine, run_id)
    assert seen.index("workflow:resumed", seen.index("signal:received")) < seen.index("timer:fired")
    assert CALLS == ["one", "two", "three"]


async def test_terminate_runs_no_compensations_where_cancel_does(
    engine: Engine, clock: FakeClock
) -> None:
    """A saga's compensation runs after ``cancel`` and never after ``terminate``."""
    cancelled = await engine.start("saga", {"n": 1})
    terminated = await engine.start("saga", {"n": 1})
    await drain(engine, clock)
    assert CALLS == ["one", "one"]
    await engine.cancel(cancelled.run_id)
    await engine.terminate(terminated.run_id)
    await drain(engine, clock)
    assert CALLS == ["one", "one", "undo"]
    assert "saga:compensated" not in await types(engine, terminated.run_id)
    run = await engine.get_run(terminated.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.terminated
    live = await _live_jobs(engine, terminated.run_id)
    assert live == []
    with pytest.raises(RunCancelledError):
        await terminated.result(timeout=5)


async def _live_jobs(engine: Engine, run_id: str) -> list[JobStatus]:
    async with engine.kernel.deps.persistence.transaction() as tx:
        jobs = await engine.kernel.deps.job_transport.live_jobs(tx, run_id)
    return [j.status for j in jobs]


async def test_with_a_running_worker_the_next_stage_starts_only_after_resume(
    engine: Engine,
) -> None:
    """The in-process worker (chained stages and claims on) pauses as the kernel says:
    stage c's ``stage:started`` comes after ``workflow:resumed`` in the run's events."""
    handle = await engine.start("pipe", {"n": 1})
    run_id = handle.run_id
    HOOKS["b"] = pause_hook(engine, [run_id])

    async def b_done_and_paused() -> bool:
        run = await engine.get_run(run_id)
        return run.paused and run.stages[1].status is StageStatus.COMPLETED

    async with worker(engine):
        await until(b_done_and_paused)
        assert await engine.resume(run_id) is True
        assert await handle.result(timeout=WAIT) == {"n": 104}
    events = await run_events(engine, run_id)
    resumed = next(e.sequence for e in events if e.type == "workflow:resumed")  # type: ignore[attr-defined]
    c_started = next(
        e.sequence
        for e in events
        if e.type == "stage:started" and e.stage_id == "c"  # type: ignore[attr-defined]
    )
    assert c_started > resumed


async def test_a_paused_run_cancelled_then_rerun_is_not_paused_any_more(
    engine: Engine, clock: FakeClock
) -> None:
    """Rerunning a run that was cancelled while paused runs it to the end: the pause
    belonged to its previous life."""
    handle = await engine.start("pipe", {"n": 1})
    HOOKS["a"] = pause_hook(engine, [handle.run_id])
    await drain(engine, clock)
    await engine.cancel(handle.run_id)
    await engine.rerun_from(handle.run_id, "b")
    await drain(engine, clock)
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert not run.paused
