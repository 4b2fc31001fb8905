"""Composition (``ctx.all``, ``ctx.race``, ``ctx.child``) end to end through ``Engine.open``
and an in-process worker on every backend: memory, a SQLite file and PostgreSQL (a
database per test). A ``FakeClock`` drives backoffs and sleeps; concurrent branch commits
of one activation and child runs reporting to their parent go through real storage."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    ChildWorkflowFailedError,
    Engine,
    NonRetryableError,
    RetryPolicy,
    RunStatus,
    WorkflowContext,
    workflow,
)
from treadle.kernel.workflows import JournalStatus
from treadle.testing import FakeClock
from treadle.tests.scenario.helpers import WAIT, until_status, worker


class Order(BaseModel):
    n: int


class Quote(BaseModel):
    n: int
    price: int


CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


async def double(n: int) -> int:
    _count("double")
    return n * 2


def triple(n: int) -> int:  # sync: runs in a thread, concurrently with its siblings
    _count("triple")
    return n * 3


async def flaky(n: int) -> int:
    info = WorkflowContext.current_step()
    assert info is not None
    _count("flaky")
    if info.attempt == 1:
        raise ConnectionError("upstream down")
    return n + 1


async def refuse(n: int) -> int:
    raise NonRetryableError(f"no {n}")


BACKOFF = RetryPolicy(
    max_attempts=3, initial_delay=timedelta(minutes=10), max_delay=timedelta(minutes=10)
)


@workflow(id="fan-out", input=Order, output=list[int])
async def fan_out(ctx: WorkflowContext, order: Order) -> list[int]:
    values: list[int] = await ctx.all(
        ctx.step("flaky", flaky, order.n, retry=BACKOFF),
        *[ctx.step("double", double, order.n + i) for i in range(3)],
        ctx.step("triple", triple, order.n),
    )
    return values


@workflow(id="deadline", input=Order, output=list[Any])
async def deadline(ctx: WorkflowContext, order: Order) -> list[Any]:
    index, value = await ctx.race(
        ctx.wait_for_signal("answer"), ctx.sleep(timedelta(hours=1), name="deadline")
    )
    return [index, value]


@workflow(id="quote", input=Order, output=Quote)
async def quote(ctx: WorkflowContext, order: Order) -> Quote:
    price: int = await ctx.step("price", double, order.n)
    if order.n < 0:
        await ctx.step("refuse", refuse, order.n)
    return Quote(n=order.n, price=price)


@workflow(id="shop", input=Order, output=list[Any])
async def shop(ctx: WorkflowContext, order: Order) -> list[Any]:
    first, second = await ctx.all(
        ctx.child("quote", {"n": order.n}), ctx.child("quote", {"n": order.n + 1})
    )
    try:
        await ctx.child("quote", {"n": -1})
    except ChildWorkflowFailedError as exc:
        return [first.price, second.price, exc.status]
    return [first.price, second.price, "no failure"]


@workflow(id="sleeper", input=Order)
async def sleeper(ctx: WorkflowContext, order: Order) -> None:
    await ctx.sleep(timedelta(days=1))
    await ctx.step("late", double, order.n)


@workflow(id="middle", input=Order)
async def middle(ctx: WorkflowContext, order: Order) -> None:
    await ctx.child("sleeper", order)


@workflow(id="top", input=Order)
async def top(ctx: WorkflowContext, order: Order) -> None:
    await ctx.child("middle", order)


WORKFLOWS = [fan_out, deadline, quote, shop, sleeper, middle, top]


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()


# -- tests -----------------------------------------------------------------------------------
async def test_all_commits_concurrent_branches_and_suspends_on_a_backoff_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """Five branches of one activation commit concurrently without deadlock; the flaky one
    suspends the run on its backoff and is the only one to run again."""
    async with worker(engine, concurrency=4):
        handle = await engine.start("fan-out", {"n": 1})
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        assert CALLS == {"flaky": 1, "double": 3, "triple": 1}
        clock.advance(timedelta(minutes=10))
        assert await handle.result(timeout=WAIT) == [2, 2, 4, 6, 3]
    assert CALLS == {"flaky": 2, "double": 3, "triple": 1}
    journal = await engine.journal(handle.run_id)
    assert [(e.position, e.name, e.occurrence) for e in journal] == [
        (0, "flaky", 1),
        (1, "double", 1),
        (2, "double", 2),
        (3, "double", 3),
        (4, "triple", 1),
    ]


async def test_race_deadline_and_winner_on_every_backend(engine: Engine, clock: FakeClock) -> None:
    """A signal arriving first wins the race; without it, the deadline's timer wins and the
    signal wait is cancelled (a later signal stays in the inbox, unconsumed)."""
    async with worker(engine, concurrency=4):
        answered = await engine.start("deadline", {"n": 1})
        late = await engine.start("deadline", {"n": 2})
        await until_status(engine, answered.run_id, RunStatus.SUSPENDED)
        await until_status(engine, late.run_id, RunStatus.SUSPENDED)
        await engine.signal(answered.run_id, "answer", "yes")
        assert await answered.result(timeout=WAIT) == [0, "yes"]
        clock.advance(timedelta(hours=1))
        assert await late.result(timeout=WAIT) == [1, None]
    journal = await engine.journal(late.run_id)
    assert [(e.kind, e.status) for e in journal] == [
        ("race", JournalStatus.COMPLETED),
        ("signal", JournalStatus.CANCELLED),
        ("sleep", JournalStatus.COMPLETED),
    ]


async def test_children_return_outputs_and_failures_on_every_backend(engine: Engine) -> None:
    """Two children started together return their typed outputs; a failing child raises
    ChildWorkflowFailedError in the parent; every child is linked to the parent."""
    async with worker(engine, concurrency=4):
        handle = await engine.start("shop", {"n": 2})
        assert await handle.result(timeout=WAIT) == [4, 6, "FAILED"]
    children = await engine.list(parent_run_id=handle.run_id)
    assert sorted(r.status.value for r in children) == ["COMPLETED", "COMPLETED", "FAILED"]
    assert {r.id for r in children} == {f"{handle.run_id}.child-{p}" for p in (0, 1, 2)}
    types = [e.type async for e in engine.events(handle.run_id)]  # type: ignore[attr-defined]
    assert types.count("child:started") == 3
    assert types.count("child:finished") == 3


async def test_cancelling_a_parent_cancels_its_descendants_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """engine.cancel on the top run cancels its child and grandchild in the same call; the
    grandchild's timer never resumes it."""
    async with worker(engine, concurrency=4):
        handle = await engine.start("top", {"n": 1})
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        (child,) = await engine.list(parent_run_id=handle.run_id)
        await until_status(engine, child.id, RunStatus.SUSPENDED)  # its child exists now
        grandchildren = await engine.list(parent_run_id=child.id)
        await until_status(engine, grandchildren[0].id, RunStatus.SUSPENDED)
        assert await engine.cancel(handle.run_id, reason="stop")
        for run_id in (handle.run_id, child.id, grandchildren[0].id):
            assert (await engine.get_run(run_id)).status is RunStatus.CANCELLED
        clock.advance(timedelta(days=2))
        from treadle.runtime.tick import maintenance_tick

        for _ in range(2):
            await maintenance_tick(engine.kernel, worker_id="test-tick")
    assert "double" not in CALLS
    assert (await engine.get_run(grandchildren[0].id)).status is RunStatus.CANCELLED
