"""A stage or step body that raises a ``BaseException`` (its own ``CancelledError``,
``SystemExit``, ``KeyboardInterrupt``) fails that attempt under the retry policy, on
memory, SQLite and PostgreSQL; only the worker's own shutdown hands a job back without
counting the attempt. (``KeyboardInterrupt`` in a real worker process: tests/cli.)"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    Engine,
    RetryPolicy,
    RunStatus,
    StageContext,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel.model import JobStatus, StageStatus
from treadle.testing import FakeClock
from treadle.tests.scenario.helpers import until_event, until_status, worker

TWICE = RetryPolicy(max_attempts=2, initial_delay=1.0, backoff=1.0, jitter=0.0)


class Kind(BaseModel):
    kind: str  # "cancelled" | "exit" | "ok"


class Done(BaseModel):
    kind: str


def _raise(kind: str) -> None:
    if kind == "cancelled":
        raise asyncio.CancelledError("the body cancelled itself")
    if kind == "exit":
        raise SystemExit(3)


@define_stage(id="raise-async", input=Kind, output=Done, retry=TWICE)
async def raise_async(ctx: StageContext[Kind, None]) -> Done:
    _raise(ctx.input.kind)
    return Done(kind=ctx.input.kind)


@define_stage(id="raise-sync", input=Kind, output=Done, retry=TWICE)
def raise_sync(ctx: StageContext[Kind, None]) -> Done:
    _raise(ctx.input.kind)
    return Done(kind=ctx.input.kind)


def raising_step(kind: str) -> str:
    _raise(kind)
    return kind


@workflow(id="raise-step", input=Kind, output=Done)
async def raise_step(ctx: WorkflowContext, req: Kind) -> Done:
    kind: str = await ctx.step("raise", raising_step, req.kind, retry=TWICE)
    return Done(kind=kind)


GATE: dict[str, Any] = {}


@define_stage(id="blocks-once", input=Kind, output=Done)
async def blocks_once(ctx: StageContext[Kind, None]) -> Done:
    """Waits on the test's gate on its first call only, so a worker can be stopped
    while it runs; later calls return at once."""
    gate = GATE.pop("gate", None)
    if gate is not None:
        gate["entered"].set()
        await asyncio.Event().wait()  # until the worker cancels it
    return Done(kind=ctx.input.kind)


WORKFLOWS = [
    WorkflowBuilder("raise-async", input=Kind).pipe(raise_async).build(),
    WorkflowBuilder("raise-sync", input=Kind).pipe(raise_sync).build(),
    raise_step,
    WorkflowBuilder("blocks-once", input=Kind).pipe(blocks_once).build(),
]


async def _job_of(engine: Engine, run_id: str, stage_id: str) -> Any:
    run = await engine.get_run(run_id)
    [stage] = [s for s in run.stages if s.stage_id == stage_id]
    assert stage.job_id is not None
    async with engine.kernel.deps.persistence.transaction() as tx:
        return stage, await engine.kernel.deps.job_transport.get(tx, stage.job_id)


@pytest.mark.parametrize(
    ("workflow_id", "stage_id", "kind", "named"),
    [
        ("raise-async", "raise-async", "cancelled", "CancelledError"),
        ("raise-sync", "raise-sync", "cancelled", "CancelledError"),
        ("raise-async", "raise-async", "exit", "SystemExit"),
        ("raise-sync", "raise-sync", "exit", "SystemExit"),
    ],
)
async def test_a_base_exception_from_a_stage_body_is_a_failed_attempt(
    engine: Engine, clock: FakeClock, workflow_id: str, stage_id: str, kind: str, named: str
) -> None:
    """The stage is retried after its backoff, then FAILS with BodyInterruptedError
    naming the exception after max_attempts (2): no endless loop, no dead worker, and the
    job ends FAILED at attempts == max_attempts."""
    async with worker(engine):
        handle = await engine.start(workflow_id, {"kind": kind})
        first = await until_event(engine, handle.run_id, "stage:failed")
        assert first.will_retry is True  # type: ignore[attr-defined]
        clock.advance(timedelta(seconds=2))  # past the 1 s backoff
        await until_status(engine, handle.run_id, RunStatus.FAILED)
        # The worker still serves other runs.
        ok = await engine.start(workflow_id, {"kind": "ok"})
        assert await ok.result(timeout=20) == {"kind": "ok"}
    stage, job = await _job_of(engine, handle.run_id, stage_id)
    assert stage.status is StageStatus.FAILED
    assert stage.attempt == 2
    assert f"BodyInterruptedError: stage {stage_id!r} raised {named}" in (stage.error or "")
    assert job.status is JobStatus.FAILED
    assert job.attempts == job.max_attempts == 2
    failures = [e for e in await _events(engine, handle.run_id) if e.type == "stage:failed"]
    assert [f.will_retry for f in failures] == [True, False]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kind", "named"), [("cancelled", "CancelledError"), ("exit", "SystemExit")]
)
async def test_a_base_exception_from_a_step_fails_the_step_under_its_policy(
    engine: Engine, clock: FakeClock, kind: str, named: str
) -> None:
    """A code-workflow step raising CancelledError or SystemExit is a failed step
    attempt: retried once after its backoff, then the run FAILS naming the exception."""
    async with worker(engine):
        handle = await engine.start("raise-step", {"kind": kind})
        await until_event(engine, handle.run_id, "step:failed")
        clock.advance(timedelta(seconds=2))
        await until_status(engine, handle.run_id, RunStatus.FAILED)
    run = await engine.get_run(handle.run_id)
    assert f"raised {named}" in (run.error or "")
    steps = await engine.journal(handle.run_id)
    assert [(s.name, s.attempts) for s in steps] == [("raise", 2)]


async def test_only_the_workers_shutdown_releases_without_counting_the_attempt(
    engine: Engine,
) -> None:
    """A worker stopped while a stage runs hands its job back with the attempt refunded
    (job attempts 0, stage PENDING at attempt 0, due now); the next worker runs it as
    attempt 1 and the run completes."""
    gate = {"entered": asyncio.Event()}
    GATE["gate"] = gate
    handle = await engine.start("blocks-once", {"kind": "ok"})
    first = worker(engine)
    await first.start()
    await asyncio.wait_for(gate["entered"].wait(), 20)
    await first.aclose(drain_timeout=0)
    stage, job = await _job_of(engine, handle.run_id, "blocks-once")
    assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)
    assert (stage.status, stage.attempt) == (StageStatus.PENDING, 0)
    async with worker(engine):
        assert await handle.result(timeout=20) == {"kind": "ok"}
    stage, job = await _job_of(engine, handle.run_id, "blocks-once")
    assert (stage.attempt, job.attempts) == (1, 1)


async def _events(engine: Engine, run_id: str) -> list[Any]:
    return [e async for e in engine.events(run_id)]


async def test_a_cancelled_execution_outside_shutdown_counts_its_attempt(engine: Engine) -> None:
    """An execution cancelled by something other than the worker's shutdown (here the
    test cancels execute_job itself) is released as errored: the attempt counts, the job
    is requeued after backoff, and at max_attempts it fails instead of looping."""
    from treadle.kernel import commands as c
    from treadle.runtime.jobs import execute_job

    gate = {"entered": asyncio.Event()}
    GATE["gate"] = gate
    handle = await engine.start("blocks-once", {"kind": "ok"})
    kernel = engine.kernel
    await kernel.dispatch(c.RunClaimPending(worker_id="w", max_claims=1))
    [job] = await kernel.deps.job_transport.dequeue("w", kernel.deps.clock.now())
    task = asyncio.ensure_future(execute_job(kernel, job, worker_id="w"))
    await asyncio.wait_for(gate["entered"].wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stage, stored = await _job_of(engine, handle.run_id, "blocks-once")
    assert (stored.status, stored.attempts) == (JobStatus.QUEUED, 1)
    assert stored.next_poll_at > kernel.deps.clock.now()  # the stage's backoff
    assert (stage.status, stage.attempt) == (StageStatus.PENDING, 1)
