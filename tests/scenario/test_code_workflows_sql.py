"""Code workflows end to end through ``Engine.open`` and an in-process worker on every
backend: memory, a SQLite file, and PostgreSQL (a database per test). The clock is a
``FakeClock`` handed to ``Engine.open``, so sleeps and backoffs of hours fire when the
test moves the clock, and the worker's maintenance tick fires the timers."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import BaseModel

from treadle import Engine, RetryPolicy, RunStatus, StepFailedError, WorkflowContext, workflow
from treadle.kernel import commands as c
from treadle.kernel.errors import InvalidPayloadError
from treadle.kernel.workflows import JournalStatus
from treadle.testing import FakeClock, SimulatedCrash
from treadle.tests.scenario.helpers import WAIT, until, until_status, worker


class Order(BaseModel):
    n: int


class Approval(BaseModel):
    approved: bool
    by: str


CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


async def double(n: int) -> int:
    _count("double")
    return n * 2


def add_one(n: int) -> int:
    _count("add_one")
    return n + 1


@workflow(id="sleepy", input=Order, output=list[int], version="1")
async def sleepy(ctx: WorkflowContext, order: Order) -> list[int]:
    a: int = await ctx.step("double", double, order.n)
    ctx.publish("phase", "sleeping")
    await ctx.sleep(timedelta(hours=6))
    b: int = await ctx.step("add_one", add_one, a)
    ctx.publish("phase", "done")
    return [a, b]


@workflow(id="approvals", input=Order, output=list[str], signals={"approve": Approval})
async def approvals(ctx: WorkflowContext, order: Order) -> list[str]:
    got: list[str] = []
    for _ in range(order.n):
        decision: Approval = await ctx.wait_for_signal("approve", Approval)
        got.append(decision.by)
        ctx.publish("count", len(got))
    return got


FLAKY: dict[str, int] = {}


async def flaky_charge(n: int) -> int:
    FLAKY["attempts"] = FLAKY.get("attempts", 0) + 1
    if FLAKY["attempts"] < FLAKY.get("succeed_on", 99):
        raise ConnectionError("gateway timeout")
    return n


@workflow(id="retries", input=Order, output=str)
async def retries(ctx: WorkflowContext, order: Order) -> str:
    policy = RetryPolicy(
        max_attempts=3, initial_delay=timedelta(minutes=30), max_delay=timedelta(hours=2)
    )
    try:
        value = await ctx.step("charge", flaky_charge, order.n, retry=policy)
    except StepFailedError as exc:
        return f"gave up after {exc.attempts}"
    return f"charged {value}"


CRASH: dict[str, int] = {}


async def crashing_step(n: int) -> int:
    CRASH["b"] = CRASH.get("b", 0) + 1
    if CRASH["b"] == 1:
        raise SimulatedCrash
    return n + 100


@workflow(id="crashy", input=Order, output=list[int])
async def crashy(ctx: WorkflowContext, order: Order) -> list[int]:
    a: int = await ctx.step("a", double, order.n)
    b: int = await ctx.step("b", crashing_step, a)
    c_: int = await ctx.step("c", add_one, b)
    return [a, b, c_]


class Bump(BaseModel):
    by: int


@workflow(id="counter", input=Order, output=int, updates={"bump": Bump})
async def counter(ctx: WorkflowContext, order: Order) -> int:
    total = order.n
    while total < 10:
        request = await ctx.wait_for_update("bump", Bump)
        total += request.payload.by
        await request.reply(total)
    return total


@workflow(id="reviewed", input=Order, output=str)
async def reviewed(ctx: WorkflowContext, order: Order) -> str:
    decision = await ctx.review({"n": order.n}, review_type="qa", reviewers=["qa-team"])
    return f"{decision.decision}:{decision.reviewer}"


WORKFLOWS = [sleepy, approvals, retries, crashy, counter, reviewed]


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    FLAKY.clear()
    CRASH.clear()


# -- tests -----------------------------------------------------------------------------------
async def test_steps_sleep_and_timer_resume_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """A run sleeps SUSPENDED (no worker held) until the clock passes its timer; the tick
    fires it, the body replays without re-running the first step, and the run completes."""
    async with worker(engine, concurrency=4):
        handle = await engine.start("sleepy", {"n": 5})
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        assert await engine.query(handle.run_id, "phase") == "sleeping"
        assert CALLS == {"double": 1}
        clock.advance(timedelta(hours=6))
        assert await handle.result(timeout=WAIT) == [10, 11]
    assert CALLS == {"double": 1, "add_one": 1}
    assert await engine.query(handle.run_id, "phase") == "done"
    journal = await engine.journal(handle.run_id)
    assert [(e.kind, e.name, e.status) for e in journal] == [
        ("step", "double", JournalStatus.COMPLETED),
        ("publish", "publish:phase", JournalStatus.COMPLETED),
        ("sleep", "sleep:sleep", JournalStatus.COMPLETED),
        ("step", "add_one", JournalStatus.COMPLETED),
        ("publish", "publish:phase", JournalStatus.COMPLETED),
    ]
    types = [e.type async for e in engine.events(handle.run_id)]  # type: ignore[attr-defined]
    assert types.count("step:completed") == 2
    assert types.count("timer:fired") == 1
    assert types[-1] == "workflow:completed"


async def test_signals_are_kept_in_order_and_delivered_once_on_every_backend(
    engine: Engine,
) -> None:
    """Signals sent before the run starts and while it waits are consumed in arrival
    order, each exactly once; a bad payload is refused naming the field."""
    handle = await engine.start("approvals", {"n": 3})
    assert await engine.signal(handle.run_id, "approve", {"approved": True, "by": "ann"})
    assert await engine.signal(handle.run_id, "approve", {"approved": True, "by": "bob"})
    with pytest.raises(InvalidPayloadError, match=r"payload\.by"):
        await engine.signal(handle.run_id, "approve", {"approved": True})
    async with worker(engine, concurrency=4):
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        assert await engine.query(handle.run_id, "count") == 2
        await engine.signal(handle.run_id, "approve", {"approved": False, "by": "cy"})
        assert await handle.result(timeout=WAIT) == ["ann", "bob", "cy"]
    inbox = await engine.kernel.reads.inbox(handle.run_id)
    assert [m.payload["by"] for m in inbox] == ["ann", "bob", "cy"]
    assert all(m.consumed_at is not None for m in inbox)


async def test_long_backoff_suspends_and_exhausted_retries_are_caught_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """A step failing with a 30-minute backoff suspends the run between attempts; after the
    last attempt the body catches StepFailedError and completes."""
    async with worker(engine, concurrency=4):
        handle = await engine.start("retries", {"n": 7})
        for attempt in (1, 2):
            await until(lambda a=attempt: FLAKY.get("attempts") == a)  # type: ignore[misc]
            await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
            clock.advance(timedelta(hours=2))
        assert await handle.result(timeout=WAIT) == "gave up after 3"
    failed = [e async for e in engine.events(handle.run_id) if e.type == "step:failed"]  # type: ignore[attr-defined]
    assert [e.will_retry for e in failed] == [True, True, False]  # type: ignore[attr-defined]


async def test_crash_between_steps_resumes_exactly_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """An execution dying in step 'b' after step 'a' committed: once its lease is reaped
    the run resumes with 'a' from the journal, 'b' runs once more, 'c' once."""
    kernel = engine.kernel
    handle = await engine.start("crashy", {"n": 1})
    await kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    (job,) = await kernel.deps.job_transport.dequeue("w1", clock.now())
    with pytest.raises(SimulatedCrash):
        await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))
    assert [e.name for e in await engine.journal(handle.run_id)] == ["a"]
    clock.advance(timedelta(minutes=5))
    reaped = await kernel.dispatch(c.LeaseReapStale(stale_threshold=timedelta(seconds=60)))
    assert reaped.released == 1
    clock.advance(timedelta(minutes=5))  # past the release backoff
    (again,) = await kernel.deps.job_transport.dequeue("w2", clock.now())
    result = await kernel.dispatch(c.JobExecute(job_id=again.id, worker_id="w2"))
    assert result.outcome == "completed"
    assert result.output == [2, 102, 103]
    assert CALLS == {"double": 1, "add_one": 1}
    assert CRASH == {"b": 2}
    journal = await engine.journal(handle.run_id)
    assert [(e.name, e.attempts) for e in journal] == [("a", 1), ("b", 1), ("c", 1)]
    assert (await engine.get_run(handle.run_id)).status is RunStatus.COMPLETED


async def test_cancel_a_sleeping_code_workflow_on_every_backend(
    engine: Engine, clock: FakeClock
) -> None:
    """Cancelling a sleeping run ends it CANCELLED; its timer never resumes it."""
    async with worker(engine, concurrency=4):
        handle = await engine.start("sleepy", {"n": 1})
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        assert await engine.cancel(handle.run_id, reason="changed mind")
        clock.advance(timedelta(hours=7))
        await _worker_ticks(engine)
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert CALLS == {"double": 1}


async def _worker_ticks(engine: Engine) -> None:
    """Run two maintenance ticks now, so any due timer had its chance to fire."""
    from treadle.runtime.tick import maintenance_tick

    for _ in range(2):
        await maintenance_tick(engine.kernel, worker_id="test-tick")


async def test_update_returns_the_bodys_reply_on_every_backend(engine: Engine) -> None:
    """engine.update wakes the waiting body through the worker and returns its reply; a
    retry with the same idempotency key returns the same reply without a second delivery."""
    async with worker(engine, concurrency=4):
        handle = await engine.start("counter", {"n": 2})
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        assert await engine.update(handle.run_id, "bump", {"by": 3}, timeout=WAIT) == 5
        assert (
            await engine.update(
                handle.run_id, "bump", {"by": 5}, timeout=WAIT, idempotency_key="second"
            )
            == 10
        )
        assert await engine.update(handle.run_id, "bump", {"by": 5}, idempotency_key="second") == 10
        assert await handle.result(timeout=WAIT) == 10
    assert len(await engine.kernel.reads.inbox(handle.run_id)) == 2


async def test_review_decision_resumes_the_run_on_every_backend(engine: Engine) -> None:
    """ctx.review suspends with review:requested; engine.decide_review wakes the worker's
    run with the decision, and a duplicate decision is refused."""
    from treadle.kernel.errors import InvalidStateError

    async with worker(engine, concurrency=4):
        handle = await engine.start("reviewed", {"n": 1})
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        requested = [
            e
            async for e in engine.events(handle.run_id)
            if e.type == "review:requested"  # type: ignore[attr-defined]
        ]
        review_id = requested[0].review_id  # type: ignore[attr-defined]
        assert await engine.decide_review(handle.run_id, review_id, "approved", reviewer="q")
        assert await handle.result(timeout=WAIT) == "approved:q"
    with pytest.raises(InvalidStateError):
        await engine.decide_review(handle.run_id, review_id, "rejected")
