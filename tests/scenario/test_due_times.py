"""Timed work wakes the worker at its due time, not at its next tick or poll: a retry
backoff, a batch stage's next check and a code workflow's durable sleep each run a
fraction of a second after they fall due, while the worker's tick is 30 s away and its
job poll 10 s. On memory, SQLite and PostgreSQL, with the real clock."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

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
from treadle.tests.scenario.helpers import WAIT

DUE = 0.3
"""Seconds until the timed work falls due."""

LATE = 2.0
"""How late it may run and still pass (generous for a loaded CI machine; without the
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
