"""Timed work wakes the worker at its due time, not at its next tick or poll: a retry
backoff, a batch stage's next check and a code workflow's durable sleep each run a
fraction of a second after they fall due, while the worker's tick is 30 s away and its
job poll 10 s. On memory, SQLite and PostgreSQL, with the real clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    Engine,
    NotReady,
    Ready,
    RetryPolicy,
    StageContext,
    Suspend,
    WorkflowBuilder,
    WorkflowContext,
    define_batch_stage,
    define_stage,
    workflow,
)
from treadle.kernel import commands as c
from treadle.runtime.jobs import execute_job
from treadle.tests.scenario.helpers import WAIT

DUE = 0.3
"""Seconds until the timed work falls due."""

LATE = 5.0
"""How late it may run and still pass (generous for a loaded 2-core machine; without the
wake-up it would wait for the 10 s job poll or the 30 s tick)."""


class N(BaseModel):
    n: int


@define_stage(
    id="flaky",
    input=N,
    output=N,
    retry=RetryPolicy(max_attempts=2, initial_delay=DUE, backoff=1.0, jitter=0.0),
)
async def flaky(ctx: StageContext[N, None]) -> N:
    if ctx.attempt == 1:
        raise ConnectionError("first attempt fails")
    return ctx.input


@define_batch_stage(id="batch", input=N, output=N)
async def batch(ctx: StageContext[N, None]) -> Any:
    return Suspend(state={"n": ctx.input.n}, poll_interval=timedelta(seconds=DUE))


@batch.check_completion
async def batch_ready(state: Any, ctx: Any) -> Any:
    return Ready(output={"n": state["n"]}) if state else NotReady()


@workflow(id="sleeper", input=N, output=N)
async def sleeper(ctx: WorkflowContext, req: N) -> N:
    await ctx.sleep(timedelta(seconds=DUE))
    return req


WORKFLOWS = [
    WorkflowBuilder("flaky", input=N).pipe(flaky).build(),
    WorkflowBuilder("batch", input=N).pipe(batch).build(),
    sleeper,
]


async def _took(url: str, workflow_id: str) -> float:
    """Seconds from the run's creation to its completion, with a worker whose tick and
    job poll are far longer than the run's timed wait."""
    async with await Engine.open(url, workflows=WORKFLOWS) as engine:
        async with engine.worker(orchestration_interval=30.0, job_poll_interval=10.0):
            handle = await engine.start(workflow_id, {"n": 1})
            assert await handle.result(timeout=WAIT) == {"n": 1}
        run = await engine.get_run(handle.run_id, with_stages=False)
    assert run.completed_at is not None
    return (run.completed_at - run.created_at).total_seconds()


async def test_a_retry_runs_when_its_backoff_ends(url: str) -> None:
    """The second attempt runs about DUE after the first failed, not at the next poll."""
    took = await _took(url, "flaky")
    assert DUE <= took < DUE + LATE


async def test_a_batch_check_runs_when_its_poll_interval_ends(url: str) -> None:
    """The suspended stage is checked about DUE after it suspended, not at the next tick."""
    took = await _took(url, "batch")
    assert DUE <= took < DUE + LATE


async def test_a_durable_sleep_ends_on_time(url: str) -> None:
    """A code workflow's ctx.sleep resumes about DUE later, not at the next tick."""
    took = await _took(url, "sleeper")
    assert DUE <= took < DUE + LATE


STARTED: dict[str, Any] = {}


@define_stage(id="split", input=N, output=N)
async def split(ctx: StageContext[N, None]) -> N:
    STARTED["left"] = asyncio.Event()
    STARTED["right"] = asyncio.Event()
    return ctx.input


@define_stage(id="left", input=N, output=N)
async def left(ctx: StageContext[N, None]) -> N:
    STARTED["left"].set()
    await asyncio.wait_for(STARTED["right"].wait(), 5)  # both run at once, or this fails
    return ctx.input


@define_stage(id="right", input=N, output=N)
async def right(ctx: StageContext[N, None]) -> N:
    STARTED["right"].set()
    await asyncio.wait_for(STARTED["left"].wait(), 5)
    return ctx.input


WORKFLOWS.append(WorkflowBuilder("fan", input=N).pipe(split).parallel([left, right]).build())


async def test_a_parallel_groups_other_stages_start_at_once(url: str) -> None:
    """The commit that chains one stage of a parallel group to this worker also wakes
    its job loop for the others: both stages run at the same time, though the job poll
    is 10 s away."""
    async with (
        await Engine.open(url, workflows=WORKFLOWS) as engine,
        engine.worker(orchestration_interval=30.0, job_poll_interval=10.0),
    ):
        handle = await engine.start("fan", {"n": 1})
        output = await handle.result(timeout=WAIT)
    assert output == {"left": {"n": 1}, "right": {"n": 1}}


# -- timed work committed elsewhere ---------------------------------------------------------
# Another process (here a second ``Engine.open``: its own connection pool and listener)
# commits the timed work; the worker under test has its tick and job poll 60 s away and
# was not running the work itself, so only the commit's notification can wake it in time.
SLOW = 60.0
OTHER = "other-process"
REACHED: dict[int, asyncio.Event] = {}


def _reached(n: int) -> None:
    REACHED[n].set()


@define_stage(
    id="x-flaky",
    input=N,
    output=N,
    retry=RetryPolicy(max_attempts=2, initial_delay=DUE, backoff=1.0, jitter=0.0),
)
async def x_flaky(ctx: StageContext[N, None]) -> N:
    if ctx.attempt == 1:
        raise ConnectionError("first attempt fails")
    _reached(ctx.input.n)
    return ctx.input


@define_batch_stage(id="x-batch", input=N, output=N)
async def x_batch(ctx: StageContext[N, None]) -> Any:
    return Suspend(state={"n": ctx.input.n}, poll_interval=timedelta(seconds=DUE))


@x_batch.check_completion
async def x_batch_ready(state: Any, ctx: Any) -> Any:
    _reached(state["n"])
    return Ready(output={"n": state["n"]})


@workflow(id="x-sleeper", input=N, output=N)
async def x_sleeper(ctx: WorkflowContext, req: N) -> N:
    await ctx.sleep(timedelta(seconds=DUE))
    _reached(req.n)
    return req


@define_stage(id="x-mark", input=N, output=N)
async def x_mark(ctx: StageContext[N, None]) -> N:
    _reached(ctx.input.n)
    return ctx.input


ELSEWHERE = [
    WorkflowBuilder("x-flaky", input=N).pipe(x_flaky).build(),
    WorkflowBuilder("x-batch", input=N).pipe(x_batch).build(),
    x_sleeper,
    WorkflowBuilder("x-mark", input=N).pipe(x_mark).build(),
]


async def _commit_timed_work(origin: Engine, kind: str, n: int) -> None:
    """Through ``origin``, as another process would: schedule a command, or lease a new
    run's first stage to itself and execute it there, which commits the retry, the
    suspension or the timer."""
    if kind == "scheduled":
        due = datetime.now(UTC) + timedelta(seconds=DUE)
        command = {"type": "run.create", "workflow_id": "x-mark", "input": {"n": n}}
        await origin.kernel.deps.scheduler.schedule(f"x-{n}", command, due)
        return
    created = await origin.kernel.dispatch(
        c.RunCreate(workflow_id=f"x-{kind}", input={"n": n}, claim_for=OTHER)
    )
    assert created.chained_job is not None
    await execute_job(origin.kernel, created.chained_job, worker_id=OTHER)


async def _runs_in_time(worker_engine: Engine, origin: Engine, kind: str) -> None:
    """Two pieces of timed work one after the other, each reaching its body within
    ``LATE``. The second is committed after the worker's first tick (and the storage
    query that follows it) is long over, so nothing but a notification tells of it."""
    async with worker_engine.worker(orchestration_interval=SLOW, job_poll_interval=SLOW):
        backend = worker_engine.backend
        if backend is not None and backend.wake_source is not None:
            await backend.wake_source.wait_listening()  # type: ignore[attr-defined]
        for n in range(2):
            REACHED[n] = asyncio.Event()
            await _commit_timed_work(origin, kind, n)
            await asyncio.wait_for(REACHED[n].wait(), LATE)


KINDS = ["flaky", "batch", "sleeper", "scheduled"]


@pytest.mark.postgres
@pytest.mark.parametrize("kind", KINDS)
async def test_timed_work_another_process_committed_runs_when_due(
    treadle_postgres_url: str, kind: str
) -> None:
    """A retry backoff, a batch check, a durable sleep and a scheduled command committed
    by another process run at their due time, though the worker's tick and job poll are
    60 s away: the commit's NOTIFY (``due:...``) tells the worker when they fall due."""
    worker_engine = await Engine.open(treadle_postgres_url, workflows=ELSEWHERE)
    origin = await Engine.open(treadle_postgres_url, workflows=ELSEWHERE)
    try:
        await _runs_in_time(worker_engine, origin, kind)
    finally:
        await origin.aclose()
        await worker_engine.aclose()


async def test_a_command_scheduled_in_process_runs_when_due(url: str) -> None:
    """A command scheduled through the worker's own engine (no execution's result tells
    of it) runs at its due time, and the run it creates is claimed at once, not at the
    next tick: the commit tells this process's workers."""
    if url.startswith("memory"):
        pytest.skip("the in-memory adapters tell no due watchers: found at the next tick")
    async with await Engine.open(url, workflows=ELSEWHERE) as engine:
        await _runs_in_time(engine, engine, "scheduled")
