"""stage.pollSuspended edge cases: what a check may use, races with cancel, unknown
workflows and several suspended stages in one run."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from treadle import NotReady, Ready, Suspend, WorkflowBuilder, define_batch_stage
from treadle.kernel import commands as c
from treadle.kernel.model import RunStatus, StageStatus
from treadle.testing import TestEngine


class In(BaseModel):
    n: int


class Cfg(BaseModel):
    threshold: int = 2


POLL = timedelta(seconds=30)


def _batch(stage_id: str, check: Any, config: type[BaseModel] | None = None) -> Any:
    @define_batch_stage(id=stage_id, input=In, output=In, config=config)
    async def body(ctx):  # type: ignore[no-untyped-def]
        return Suspend(state={"n": ctx.input.n}, poll_interval=POLL)

    body.check_completion(check)
    return body


async def test_check_gets_config_artifacts_and_harmless_progress() -> None:
    """A check sees the stage config with defaults and artifacts; progress and heartbeat
    are accepted and do nothing."""
    seen: list[Any] = []

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        ctx.progress(0.5, "polling")
        ctx.heartbeat()
        await ctx.artifacts.put("poll.txt", "polled")
        assert await ctx.artifacts.has("poll.txt")
        assert await ctx.artifacts.list() == ["poll.txt"]
        seen.append((ctx.config.threshold, await ctx.artifacts.get("poll.txt"), ctx.attempt))
        return Ready(output={"n": state["n"] * ctx.config.threshold})

    te = TestEngine([WorkflowBuilder("b", input=In).pipe(_batch("b1", check, Cfg)).build()])
    handle = await te.start("b", {"n": 5})
    await te.advance_time(POLL)
    assert await handle.result() == {"n": 10}
    assert seen == [(2, b"polled", 1)]
    assert "stage:progress" not in te.event_sink.types(handle.run_id)


async def test_cancel_during_check_discards_verdict() -> None:
    """A run cancelled while its check runs keeps its CANCELLED stage; nothing resumes."""
    te = TestEngine()

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        await te.cancel(ctx.run_id)
        return Ready(output={"n": 1})

    te.register(WorkflowBuilder("b", input=In).pipe(_batch("b1", check)).build())
    handle = await te.start("b", {"n": 5})
    await te.run_until_idle()
    te.clock.advance(POLL)
    result = await te.dispatch(c.StagePollSuspended())
    assert (result.checked, result.resumed, result.failed) == (1, 0, 0)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.stages[0].status is StageStatus.CANCELLED
    assert run.stages[0].output is None


async def test_unknown_workflow_is_not_polled() -> None:
    """Suspended stages of a workflow this worker lacks are left for another worker."""

    async def check(state, ctx):  # type: ignore[no-untyped-def]
        raise AssertionError("not polled")

    te = TestEngine([WorkflowBuilder("b", input=In).pipe(_batch("b1", check)).build()])
    handle = await te.start("b", {"n": 5})
    await te.run_until_idle()
    te.registry.unregister("b")
    te.clock.advance(POLL)
    result = await te.dispatch(c.StagePollSuspended())
    assert result.checked == 0
    assert (await te.get_run(handle.run_id)).stages[0].status is StageStatus.SUSPENDED


async def test_parallel_suspended_stages_resume_independently() -> None:
    """Two suspended stages of one run are polled together; with one ready the run stays
    SUSPENDED on the other, and it completes when both are ready."""
    answers = {"x": [Ready(output={"n": 1})], "y": [NotReady(), Ready(output={"n": 2})]}

    def make_check(stage_id: str) -> Any:
        async def check(state, ctx):  # type: ignore[no-untyped-def]
            return answers[stage_id].pop(0)

        return check

    wf = (
        WorkflowBuilder("p", input=In)
        .parallel([_batch("x", make_check("x")), _batch("y", make_check("y"))])
        .build()
    )
    te = TestEngine([wf])
    handle = await te.start("p", {"n": 5})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    te.clock.advance(POLL)
    result = await te.dispatch(c.StagePollSuspended())
    assert (result.checked, result.resumed) == (2, 1)
    assert result.resumed_workflow_run_ids == [handle.run_id]
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.SUSPENDED
    assert {s.stage_id: s.status for s in run.stages} == {
        "x": StageStatus.COMPLETED,
        "y": StageStatus.SUSPENDED,
    }
    assert (await te.dispatch(c.RunTransition(workflow_run_id=handle.run_id))).action == "noop"
    await te.advance_time(POLL)
    assert await handle.result() == {"x": {"n": 1}, "y": {"n": 2}}
