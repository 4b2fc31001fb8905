"""Continue-as-new in the ``TestEngine`` (virtual clock): chains driven by timers, the
version a continuation pins, a child that continues, updates to an old run id, and the
atomicity of the hand-over (a commit that fails leaves the old run alone, never two)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import RunStatus, WorkflowContext, workflow
from treadle.adapters.memory.persistence.runs import MemoryRuns
from treadle.kernel.errors import RunCancelledError, TransientStorageError
from treadle.kernel.model import Run
from treadle.testing import TestEngine


class Days(BaseModel):
    left: int
    slept: int = 0


@workflow(id="daily", input=Days, output=int, version="1")
async def daily_v1(ctx: WorkflowContext, days: Days) -> int:
    await ctx.sleep(timedelta(days=1))
    if days.left > 1:
        ctx.continue_as_new(Days(left=days.left - 1, slept=days.slept + 1))
    return days.slept + 1


@workflow(id="daily", input=Days, output=int, version="2")
async def daily_v2(ctx: WorkflowContext, days: Days) -> int:
    return 1000 + days.slept


@workflow(id="parent", input=Days, output=int)
async def parent(ctx: WorkflowContext, days: Days) -> int:
    result: int = await ctx.child("daily", days)
    return result


@workflow(id="forever", input=Days, output=int, execution_timeout=timedelta(days=2, hours=12))
async def forever(ctx: WorkflowContext, days: Days) -> int:
    await ctx.sleep(timedelta(days=1))
    ctx.continue_as_new(Days(left=days.left, slept=days.slept + 1))


class Ask(BaseModel):
    q: str


@workflow(id="answerer", input=Days, output=str, updates={"ask": Ask})
async def answerer(ctx: WorkflowContext, days: Days) -> str:
    request = await ctx.wait_for_update("ask", Ask)
    await request.reply(f"run {days.left} answers {request.payload.q}")
    if days.left:
        ctx.continue_as_new(Days(left=days.left - 1))
    return "done"


async def _chain(te: TestEngine, run_id: str) -> list[Run]:
    runs = [await te.get_run(run_id)]
    while runs[-1].continued_as is not None:
        runs.append(await te.get_run(runs[-1].continued_as))
    return runs


async def test_a_chain_of_timers_runs_on_the_virtual_clock() -> None:
    """Each run sleeps a day and continues; ``advance_time`` drives the whole chain and
    the first handle answers with the last run's output."""
    te = TestEngine(workflows=[daily_v1])
    handle = await te.start("daily", {"left": 3})
    await te.run_until_idle()
    assert len(await _chain(te, handle.run_id)) == 1
    await te.advance_time(timedelta(days=1))
    assert len(await _chain(te, handle.run_id)) == 2
    await te.advance_time(timedelta(days=2))
    assert await handle.result() == 3
    runs = await _chain(te, handle.run_id)
    assert [r.status for r in runs] == [RunStatus.COMPLETED] * 3
    assert [r.input for r in runs] == [
        {"left": 3, "slept": 0},
        {"left": 2, "slept": 1},
        {"left": 1, "slept": 2},
    ]
    assert [len(await te.kernel.reads.journal(r.id)) for r in runs] == [1, 1, 1]  # a sleep each
    types = [e.type for e in te.events if e.workflow_run_id == runs[0].id]  # type: ignore[attr-defined]
    assert types[-2:] == ["stage:completed", "workflow:continuedAsNew"]


async def test_the_new_run_pins_the_version_registered_now() -> None:
    """A run of version 1 that continues after version 2 was deployed continues under
    version 2 (new runs start under the newest version); the old run kept version 1."""
    te = TestEngine(workflows=[daily_v1])
    handle = await te.start("daily", {"left": 2})
    await te.run_until_idle()
    te.register(daily_v2)  # a deploy while the run sleeps
    await te.advance_time(timedelta(days=1))
    assert await handle.result() == 1001
    first, second = await _chain(te, handle.run_id)
    assert (first.workflow_version, second.workflow_version) == ("1", "2")
    ended = [e for e in te.events if e.type == "workflow:continuedAsNew"]  # type: ignore[attr-defined]
    assert ended[0].workflow_version == "2"  # type: ignore[attr-defined]


async def test_the_execution_timeout_caps_the_whole_chain() -> None:
    """The new run keeps the old run's deadline: a workflow that continues every day
    under a 2.5-day execution timeout is cancelled during its third run."""
    te = TestEngine(workflows=[forever])
    handle = await te.start("forever", {"left": 0})
    await te.run_until_idle()
    await te.advance_time(timedelta(days=3))
    with pytest.raises(RunCancelledError, match="execution timeout"):
        await handle.result()
    chain = await _chain(te, handle.run_id)
    assert [r.status for r in chain] == [RunStatus.COMPLETED] * 2 + [RunStatus.CANCELLED]


async def test_a_parent_awaits_its_child_to_the_end_of_the_chain() -> None:
    """A child that continues as new is still the parent's child: the parent gets the
    chain's result, not the first child run's missing output."""
    te = TestEngine(workflows=[daily_v1, parent])
    handle = await te.start("parent", {"left": 2})
    await te.run_until_idle()
    await te.advance_time(timedelta(days=2))
    assert await handle.result() == 2
    children = [r for r in await te.kernel.reads.list_runs() if r.workflow_id == "daily"]
    assert {r.parent_run_id for r in children} == {handle.run_id}
    assert len(children) == 2


async def test_an_update_to_an_old_run_id_is_forwarded_and_answered() -> None:
    """An update sent to a run that continued is delivered to the newest run, whose
    reply the caller gets."""
    te = TestEngine(workflows=[answerer])
    handle = await te.start("answerer", {"left": 1})
    assert await te.update(handle.run_id, "ask", {"q": "a"}) == "run 1 answers a"
    assert (await te.get_run(handle.run_id)).continued_as is not None
    assert await te.update(handle.run_id, "ask", {"q": "b"}) == "run 0 answers b"
    assert await handle.result() == "done"


async def test_a_failed_hand_over_leaves_the_old_run_and_no_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old run's end and the new run's creation are one transaction: when it fails,
    neither is written (the old run is still live, alone); the activation is retried and
    the chain goes on with exactly one continuation."""
    failures: list[str] = []
    insert_run = MemoryRuns.insert

    async def failing_once(self: MemoryRuns, run: Run) -> None:
        if "continued_from" in run.search_attributes and not failures:
            failures.append(run.id)
            raise TransientStorageError("connection lost during the hand-over")
        await insert_run(self, run)

    monkeypatch.setattr(MemoryRuns, "insert", failing_once)
    te = TestEngine(workflows=[daily_v1])
    handle = await te.start("daily", {"left": 2})
    await te.run_until_idle()
    await te.advance_time(timedelta(hours=25))
    assert failures
    await te.advance_time(timedelta(days=2))
    assert await handle.result() == 2
    chain = await _chain(te, handle.run_id)
    assert len(chain) == 2
    assert chain[0].continued_as != failures[0]  # the rolled-back link was never stored
    runs: list[Any] = await te.kernel.reads.list_runs()
    assert sorted(r.id for r in runs) == sorted(r.id for r in chain)
