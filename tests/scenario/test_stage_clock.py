"""``ctx.now()`` in stage bodies and batch checks reads the engine's Clock port, so
time-based logic runs on the virtual clock of ``TestEngine`` (issue 13, item 14)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from treadle import (
    NotReady,
    Ready,
    Suspend,
    WorkflowBuilder,
    define_batch_stage,
    define_stage,
)
from treadle.kernel.model import RunStatus
from treadle.testing import TestEngine


class Empty(BaseModel):
    pass


class Stamp(BaseModel):
    at: datetime


@define_stage(id="stamp", input=Empty, output=Stamp)
async def stamp(ctx):  # type: ignore[no-untyped-def]
    return Stamp(at=ctx.now())


@define_stage(id="stamp-sync", input=Empty, output=Stamp)
def stamp_sync(ctx):  # type: ignore[no-untyped-def]
    return Stamp(at=ctx.now())


async def test_stage_body_reads_the_engine_clock() -> None:
    """An async and a sync stage body get ``ctx.now()`` from the fake clock, not the
    system clock: the stored output is the virtual time, moved by ``advance_time``."""
    te = TestEngine(
        [
            WorkflowBuilder("stamp-wf", input=Empty).pipe(stamp).build(),
            WorkflowBuilder("stamp-sync-wf", input=Empty).pipe(stamp_sync).build(),
        ]
    )
    await te.advance_time(timedelta(days=3))
    expected = te.clock.now()
    for workflow_id in ("stamp-wf", "stamp-sync-wf"):
        handle = await te.start(workflow_id, {})
        await te.run_until_idle()
        run = await te.get_run(handle.run_id)
        assert run.status is RunStatus.COMPLETED
        assert datetime.fromisoformat(run.output["at"]) == expected  # type: ignore[index]


READY_AFTER = timedelta(minutes=12)
POLL = timedelta(minutes=5)


def _deadline_engine(checked_at: list[datetime]) -> TestEngine:
    @define_batch_stage(id="wait-window", input=Empty, output=Stamp)
    async def wait_window(ctx):  # type: ignore[no-untyped-def]
        if ctx.resume_state is not None:
            return Stamp(at=ctx.now())
        ready_at = ctx.now() + READY_AFTER
        return Suspend(
            state={"ready_at": ready_at.isoformat()},
            poll_interval=POLL,
            max_wait=timedelta(hours=1),
        )

    @wait_window.check_completion
    async def check(state: Any, ctx: Any) -> Any:
        now = ctx.now()
        checked_at.append(now)
        if now >= datetime.fromisoformat(state["ready_at"]):
            return Ready(output={"at": now.isoformat()})
        return NotReady()

    return TestEngine([WorkflowBuilder("window", input=Empty).pipe(wait_window).build()])


async def test_batch_check_uses_the_virtual_clock() -> None:
    """A ``check_completion`` that waits for a point in time sees ``ctx.now()`` move with
    ``advance_time``: not ready at the 5 and 10 minute polls, ready at the 15 minute one,
    without any real waiting."""
    checked_at: list[datetime] = []
    te = _deadline_engine(checked_at)
    start = te.clock.now()
    handle = await te.start("window", {})
    await te.run_until_idle()
    await te.advance_time(timedelta(minutes=10))
    assert checked_at == [start + POLL, start + 2 * POLL]
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    await te.advance_time(timedelta(minutes=5))
    assert checked_at[-1] == start + 3 * POLL
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert datetime.fromisoformat(run.output["at"]) == start + 3 * POLL  # type: ignore[index]
