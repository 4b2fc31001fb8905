"""Concurrency and rate limits (kernel/flow_control.py) through the Engine and TestEngine.

A limited run holds its slot from its claim to its end; the runs over a limit stay
PENDING in their order and the claim passes over them to others; a run's end wakes the
worker to claim the next one, and a rate window's end does too."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from pydantic import BaseModel

from treadle import DefinitionError, Engine, RunStatus, StageContext, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.flow_control import RateLimit
from treadle.testing import TestEngine
from treadle.tests.scenario.helpers import WAIT, until_status, worker


class Item(BaseModel):
    name: str


GATES: dict[str, asyncio.Event] = {}
LOG: list[str] = []
"""``start <name>`` and ``end <name>`` as stage bodies begin and finish, in order: the
engine's clock is virtual, so stored times cannot order what happened."""


@define_stage(id="work", input=Item, output=Item)
async def work(ctx: StageContext[Item, None]) -> Item:
    LOG.append(f"start {ctx.input.name}")
    gate = GATES.get(ctx.input.name)
    if gate is not None:
        await gate.wait()
    await asyncio.sleep(0)  # let another body start here if the limit allowed one
    LOG.append(f"end {ctx.input.name}")
    return ctx.input


def _most_at_once(log: list[str]) -> int:
    inside = most = 0
    for entry in log:
        inside += 1 if entry.startswith("start") else -1
        most = max(most, inside)
    return most


PER_TENANT = WorkflowBuilder("per-tenant", input=Item, concurrency_per_key=1).pipe(work).build()
TWO_AT_ONCE = WorkflowBuilder("two-at-once", input=Item, concurrency=2).pipe(work).build()
BOTH = WorkflowBuilder("both", input=Item, concurrency=2, concurrency_per_key=1).pipe(work).build()
WORKFLOWS = [PER_TENANT, TWO_AT_ONCE, BOTH]


@pytest.fixture(autouse=True)
def _gates() -> None:
    GATES.clear()
    LOG.clear()


async def _claim(engine: Engine) -> c.RunClaimPendingResult:
    """A claim as a worker's tick makes it (the jobs it queues run on any worker)."""
    return await engine.kernel.dispatch(c.RunClaimPending(worker_id="claimer", max_claims=10))


async def test_runs_sharing_a_key_run_one_at_a_time_in_order(engine: Engine) -> None:
    """``concurrency_per_key=1``: a claim starts the first run of tenant ``a`` and of
    tenant ``b`` and passes over the second of ``a`` (reported deferred, left PENDING);
    the first run's end wakes the worker, whose claim starts the second."""
    a1 = await engine.start("per-tenant", {"name": "a1"}, concurrency_key="a")
    a2 = await engine.start("per-tenant", {"name": "a2"}, concurrency_key="a")
    b1 = await engine.start("per-tenant", {"name": "b1"}, concurrency_key="b")
    first = await _claim(engine)
    assert [r.workflow_run_id for r in first.claimed] == [a1.run_id, b1.run_id]
    assert first.deferred == 1
    again = await _claim(engine)
    assert (again.claimed, again.deferred) == ([], 1)
    assert (await engine.get_run(a2.run_id)).status is RunStatus.PENDING
    async with worker(engine, concurrency=4):
        assert await a2.result(timeout=WAIT) == {"name": "a2"}
        assert await b1.result(timeout=WAIT) == {"name": "b1"}
    assert LOG.index("start a2") > LOG.index("end a1")
    assert (await engine.get_run(a2.run_id)).concurrency_key == "a"


async def test_a_workflow_limit_caps_all_its_runs(engine: Engine) -> None:
    """``concurrency=2``: of four runs two start; while their stages are held no other
    starts; releasing them lets the rest in, two at a time."""
    names = [f"r{i}" for i in range(4)]
    for name in names[:2]:
        GATES[name] = asyncio.Event()
    handles = [await engine.start("two-at-once", {"name": name}) for name in names]
    async with worker(engine, concurrency=4):
        await until_status(engine, handles[0].run_id, RunStatus.RUNNING)
        await until_status(engine, handles[1].run_id, RunStatus.RUNNING)
        for handle in handles[2:]:
            assert (await engine.get_run(handle.run_id)).status is RunStatus.PENDING
        for name in names[:2]:
            GATES[name].set()
        for name, handle in zip(names, handles, strict=True):
            assert await handle.result(timeout=WAIT) == {"name": name}
    runs = [await engine.get_run(h.run_id) for h in handles]
    last_of_first_two = max(r.completed_at for r in runs[:2] if r.completed_at is not None)
    assert all(r.started_at is not None and r.started_at >= last_of_first_two for r in runs[3:])


async def test_a_claim_looks_past_a_full_key_without_passing_the_workflow_limit(
    engine: Engine,
) -> None:
    """``concurrency=2, concurrency_per_key=1``, a claim of three: its first pass starts
    ``a1`` and passes over ``a2`` and ``a3`` (key ``a`` full); its second pass, past key
    ``a``, counts ``a1`` (not yet stored RUNNING) and starts only ``b1``: two in all."""
    runs = {}
    for name in ("a1", "a2", "a3", "b1", "c1"):
        key = name[0]
        runs[name] = await engine.start("both", {"name": name}, concurrency_key=key)
    claimed = await engine.kernel.dispatch(c.RunClaimPending(worker_id="claimer", max_claims=3))
    assert [r.workflow_run_id for r in claimed.claimed] == [runs["a1"].run_id, runs["b1"].run_id]
    assert claimed.deferred == 3
    pending = [
        n for n, h in runs.items() if (await engine.get_run(h.run_id)).status.value == "PENDING"
    ]
    assert pending == ["a2", "a3", "c1"]


RATED = (
    WorkflowBuilder("rated", input=Item, rate_limit=RateLimit(2, per=timedelta(minutes=1)))
    .pipe(work)
    .build()
)


async def test_a_rate_limit_starts_n_runs_per_period_on_the_virtual_clock() -> None:
    """``RateLimit(2, per=1 min)``: five runs start two, two and one a minute apart."""
    te = TestEngine([RATED])
    handles = [await te.start("rated", {"name": f"n{i}"}) for i in range(5)]
    finished: list[int] = []
    for _ in range(3):
        await te.run_until_idle()
        runs = [await te.get_run(h.run_id) for h in handles]
        finished.append(sum(r.status is RunStatus.COMPLETED for r in runs))
        await te.advance_time(timedelta(minutes=1))
    assert finished == [2, 4, 5]


def test_limits_are_checked_where_they_are_declared() -> None:
    with pytest.raises(DefinitionError, match="concurrency must be a positive integer"):
        WorkflowBuilder("w", input=Item, concurrency=0)
    with pytest.raises(DefinitionError, match="concurrency_per_key must be a positive integer"):
        WorkflowBuilder("w", input=Item, concurrency_per_key=True)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="rate_limit must be a RateLimit"):
        WorkflowBuilder("w", input=Item, rate_limit=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per must be"):
        RateLimit(1, per=-1)
    with pytest.raises(ValueError, match="greater than 0"):
        RateLimit(0, per=60)
