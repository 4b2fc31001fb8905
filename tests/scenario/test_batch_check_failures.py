"""The bound on completion checks that raise, on memory, a SQLite file and PostgreSQL:
the count is stored on the stage, so it holds across a restart of the process (a new
``Engine`` on the same database), and the last failed check fails the stage and the run
through the normal transition."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from treadle import Engine, RunStatus, Suspend, WorkflowBuilder, define_batch_stage
from treadle.kernel import commands as c
from treadle.kernel.model import StageStatus
from treadle.testing import FakeClock
from treadle.tests.scenario.helpers import run_events, until_status, worker

POLL = timedelta(minutes=5)


class In(BaseModel):
    n: int


class Out(BaseModel):
    total: int


@define_batch_stage(id="batch", input=In, output=Out, max_check_failures=3)
async def batch(ctx):  # type: ignore[no-untyped-def]
    return Suspend(state={"submitted": ctx.input.n}, poll_interval=POLL, max_wait=POLL * 100)


@batch.check_completion
async def check(state, ctx):  # type: ignore[no-untyped-def]
    raise ConnectionError("status endpoint down")


WORKFLOWS = [WorkflowBuilder("flaky-batch", input=In).pipe(batch).build()]


async def _poll(engine: Engine, clock: FakeClock) -> c.StagePollSuspendedResult:
    clock.advance(POLL)
    return await engine.kernel.dispatch(c.StagePollSuspended())


async def _stage(engine: Engine, run_id: str) -> Any:
    return (await engine.get_run(run_id)).stages[0]


async def test_failed_checks_are_counted_in_storage_and_fail_the_run_at_the_bound(
    engine: Engine, clock: FakeClock, url: str
) -> None:
    """Two failed checks leave the stage SUSPENDED with check_failures 2 in storage; the
    third (after a restart where the backend persists) fails stage and run with the
    error named, recording stage:failed and workflow:failed."""
    handle = await engine.start("flaky-batch", {"n": 1})
    async with worker(engine):
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
    for failures in (1, 2):
        result = await _poll(engine, clock)
        assert (result.checked, result.failed) == (1, 0)
        stage = await _stage(engine, handle.run_id)
        assert (stage.status, stage.check_failures) == (StageStatus.SUSPENDED, failures)

    restarted = engine
    if not url.startswith("memory"):  # a new process: only the database remembers
        restarted = await Engine.open(url, workflows=WORKFLOWS, clock=clock)
    try:
        assert (await _stage(restarted, handle.run_id)).check_failures == 2
        result = await _poll(restarted, clock)
        assert (result.checked, result.failed) == (1, 1)
        run = await restarted.get_run(handle.run_id)
        events = await run_events(restarted, handle.run_id)
    finally:
        if restarted is not engine:
            await restarted.aclose()
    stage = run.stages[0]
    assert (run.status, stage.status, stage.check_failures) == (
        RunStatus.FAILED,
        StageStatus.FAILED,
        3,
    )
    assert "ConnectionError: status endpoint down" in (stage.error or "")
    assert "ConnectionError: status endpoint down" in (run.error or "")
    kinds = [e.type for e in events]  # type: ignore[attr-defined]
    assert kinds[-2:] == ["stage:failed", "workflow:failed"]
    # The last failed check's traceback, through the check function, is kept too.
    assert stage.error_traceback is not None
    assert 'raise ConnectionError("status endpoint down")' in stage.error_traceback
    assert events[-2].traceback == stage.error_traceback  # type: ignore[attr-defined]
