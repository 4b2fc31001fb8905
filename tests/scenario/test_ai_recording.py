"""AI calls recorded through ``ctx.ai.record``: committed with the outcome of the stage
attempt or step attempt that made them, failed attempts counted and marked, nothing
recorded twice by a replay, and a clear error where no attempt can own a call."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, WorkflowContext, define_stage, workflow
from treadle.kernel.ai import AICall
from treadle.kernel.errors import AIRecordError, RunFailedError
from treadle.testing import TestEngine


class In(BaseModel):
    n: int


async def _calls(te: TestEngine, run_id: str) -> list[AICall]:
    async with te.persistence.transaction() as tx:
        return await tx.ai_calls.for_run(run_id)


async def _totals(te: TestEngine, run_id: str):  # type: ignore[no-untyped-def]
    async with te.persistence.transaction() as tx:
        return (await tx.ai_calls.totals([run_id]))[run_id]


async def test_stage_calls_commit_with_each_attempt() -> None:
    """A stage that records a call, fails once, then succeeds leaves two calls: the first
    marked as a failed attempt, both in the run's totals, stamped with run and attempt."""

    @define_stage(id="ask", input=In, output=In, retry=RetryPolicy(max_attempts=2))
    async def ask(ctx):  # type: ignore[no-untyped-def]
        ctx.ai.record(AICall(model="m", cost=Decimal("0.01"), input_tokens=3, output_tokens=2))
        if ctx.attempt == 1:
            raise ConnectionError("provider hiccup")
        return ctx.input

    te = TestEngine([WorkflowBuilder("wf", input=In).pipe(ask).build()])
    handle = await te.start("wf", {"n": 1})
    await te.advance_time(10)
    assert await handle.result() == {"n": 1}
    calls = await _calls(te, handle.run_id)
    assert [(c.attempt, c.failed_attempt, c.stage_id) for c in calls] == [
        (1, True, "ask"),
        (2, False, "ask"),
    ]
    assert all(c.workflow_run_id == handle.run_id and c.workflow_id == "wf" for c in calls)
    assert all(c.created_at is not None for c in calls)
    totals = await _totals(te, handle.run_id)
    assert (totals.total_cost, totals.total_tokens, totals.failed_calls) == (
        Decimal("0.02"),
        10,
        1,
    )


async def test_stage_failing_for_good_keeps_its_calls() -> None:
    """The calls of a stage that fails for good are kept (they were paid for), marked."""

    @define_stage(id="ask", input=In, output=In, retry=RetryPolicy(max_attempts=1))
    async def ask(ctx):  # type: ignore[no-untyped-def]
        ctx.ai.record(AICall(model="m", cost=Decimal("0.5")))
        raise ValueError("bad answer")

    te = TestEngine([WorkflowBuilder("wf", input=In).pipe(ask).build()])
    handle = await te.start("wf", {"n": 1})
    await te.run_until_idle()
    with pytest.raises(RunFailedError):
        await handle.result()
    [call] = await _calls(te, handle.run_id)
    assert call.failed_attempt
    assert (await _totals(te, handle.run_id)).total_cost == Decimal("0.5")


async def test_step_calls_commit_with_the_step_and_replay_records_nothing() -> None:
    """In a code workflow a call recorded inside a step is committed with that step (a
    failed attempt's marked); replays of the body after a sleep record nothing again."""
    attempts: list[int] = []

    @workflow(id="cw", input=In, output=In)
    async def cw(ctx: WorkflowContext, data: In) -> In:
        async def ask() -> int:
            info = ctx.current_step()
            assert info is not None
            attempts.append(info.attempt)
            ctx.ai.record(AICall(model="m", cost=Decimal("0.1"), topic="ask"))
            if info.attempt == 1:
                raise ConnectionError("429")
            return data.n + 1

        n = await ctx.step("ask", ask, retry=RetryPolicy(max_attempts=3, initial_delay=0))
        await ctx.sleep(60)
        return In(n=n)

    te = TestEngine([cw])
    handle = await te.start("cw", {"n": 1})
    await te.advance_time(120)
    assert await handle.result() == {"n": 2}
    assert attempts == [1, 2]
    calls = await _calls(te, handle.run_id)
    assert [(c.step, c.attempt, c.failed_attempt) for c in calls] == [
        ("ask#1", 1, True),
        ("ask#1", 2, False),
    ]
    assert (await _totals(te, handle.run_id)).total_cost == Decimal("0.2")


async def test_recording_from_a_workflow_body_is_refused() -> None:
    """``ctx.ai.record`` in a code workflow body, outside any step, raises AIRecordError."""
    seen: list[BaseException] = []

    @workflow(id="cw", input=In, output=In)
    async def cw(ctx: WorkflowContext, data: In) -> In:
        try:
            ctx.ai.record(AICall(model="m"))
        except AIRecordError as exc:
            seen.append(exc)
        return data

    te = TestEngine([cw])
    handle = await te.start("cw", {"n": 1})
    await te.run_until_idle()
    assert await handle.result() == {"n": 1}
    assert len(seen) == 1
    assert "while a step runs" in str(seen[0])
    assert await _calls(te, handle.run_id) == []


async def test_calls_of_a_discarded_result_are_kept_as_failed() -> None:
    """A run cancelled while a stage or a step runs discards its result (a ghost), but the
    calls the stage or step made were paid for: they are recorded, marked failed."""
    engines: list[TestEngine] = []

    @define_stage(id="ask", input=In, output=In)
    async def ask(ctx):  # type: ignore[no-untyped-def]
        ctx.ai.record(AICall(model="m", cost=Decimal("0.3")))
        await engines[0].cancel(ctx.run_id, reason="user")
        return ctx.input

    @workflow(id="cw", input=In, output=In)
    async def cw(ctx: WorkflowContext, data: In) -> In:
        async def step() -> int:
            ctx.ai.record(AICall(model="m", cost=Decimal("0.2")))
            await engines[0].cancel(ctx.run_id, reason="user")
            return 1

        await ctx.step("ask", step)
        return data

    te = TestEngine([WorkflowBuilder("wf", input=In).pipe(ask).build(), cw])
    engines.append(te)
    for workflow_id, cost in (("wf", Decimal("0.3")), ("cw", Decimal("0.2"))):
        handle = await te.start(workflow_id, {"n": 1})
        await te.run_until_idle()
        [call] = await _calls(te, handle.run_id)
        assert call.failed_attempt
        assert (await _totals(te, handle.run_id)).total_cost == cost
