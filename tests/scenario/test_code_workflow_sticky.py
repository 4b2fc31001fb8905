"""Sticky execution (issue 11, ``kernel/workflows/sticky.py``): a code workflow's body
parks where it waits and the run's next activation on the same kernel resumes it, so a
wake-up neither re-runs the body from the top nor reads the whole journal. These tests
check that the parked body is used, that anything that could make it stale sends the
run back to replay (another kernel, a cancel, a fork, eviction, a crash, a changed
definition), and that results are the same with the cache on and off.

The cross-backend tests drive the kernel by hand (claim, dequeue, ``job.execute``) on
memory and PostgreSQL; the others use the ``TestEngine``."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, RetryPolicy, RunStatus, WorkflowContext, workflow
from treadle.kernel import commands as c
from treadle.kernel.kernel import Kernel, KernelSettings, create_kernel
from treadle.kernel.workflows import JournalEntry
from treadle.kernel.workflows.sticky import StickyCache
from treadle.testing import FakeClock, SimulatedCrash, TestEngine

ENTERED: dict[str, int] = {}
"""Body entries per workflow: 1 while every activation resumes the parked body."""
CALLS: dict[str, int] = {}
"""Real executions of each step function."""
CLEANUP: list[str] = []
"""What a body's ``finally`` saw when the body was dropped."""
CRASH_AT: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _reset() -> None:
    ENTERED.clear()
    CALLS.clear()
    CLEANUP.clear()
    CRASH_AT.clear()


def _enter(name: str) -> None:
    ENTERED[name] = ENTERED.get(name, 0) + 1


async def record(total: int) -> int:
    CALLS["record"] = CALLS.get("record", 0) + 1
    if CRASH_AT.get("record") == CALLS["record"]:
        raise SimulatedCrash
    return total


def cleanup_step() -> str:
    CALLS["cleanup"] = CALLS.get("cleanup", 0) + 1
    return "cleaned"


@workflow(id="ticks", input=int, output=int)
async def ticks(ctx: WorkflowContext, n: int) -> int:
    """Waits for ``n`` signals, recording the running total after each in a step."""
    _enter("ticks")
    total = 0
    try:
        for _ in range(n):
            total += await ctx.wait_for_signal("tick", int)
            total = await ctx.step("record", record, total)
    finally:
        if ENTERED.get("probe-finally"):
            try:  # the body is being dropped: this must neither run nor be journaled
                await ctx.step("cleanup", cleanup_step)
            except BaseException as exc:  # what the ctx call raised is the point
                CLEANUP.append(type(exc).__name__)
    return total


WORKFLOWS = [ticks]
"""For the ``engine`` fixture of ``conftest``."""

BACKENDS = pytest.mark.parametrize(
    "url", ["memory", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


# -- helpers --------------------------------------------------------------------------------
async def drain(kernel: Kernel, worker_id: str = "w1") -> list[c.JobExecuteResult]:
    """Claim pending runs, then execute every due job one at a time (as one worker)."""
    await kernel.dispatch(c.RunClaimPending(worker_id=worker_id))
    results = []
    while True:
        jobs = await kernel.deps.job_transport.dequeue(worker_id, kernel.deps.clock.now(), limit=1)
        if not jobs:
            return results
        results.append(await kernel.dispatch(c.JobExecute(job_id=jobs[0].id, worker_id=worker_id)))


async def tick(engine: Engine, run_id: str, value: int, kernel: Kernel | None = None) -> None:
    """Signal ``tick`` and let ``kernel`` (the engine's by default) run the wake-up."""
    await engine.signal(run_id, "tick", value)
    (result,) = await drain(kernel or engine.kernel)
    assert result.outcome in ("suspended", "completed"), result


def twin(kernel: Kernel, **settings: Any) -> Kernel:
    """Another kernel (another worker process) on the same storage."""
    deps = kernel.deps
    return create_kernel(
        persistence=deps.persistence,
        job_transport=deps.job_transport,
        blob_store=deps.blob_store,
        event_sink=deps.event_sink,
        scheduler=deps.scheduler,
        clock=deps.clock,
        registry=deps.registry,
        settings=KernelSettings(**settings),
    )


def cache(engine: Engine | TestEngine) -> StickyCache:
    return engine.kernel.deps.sticky


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int | None, int]]:
    """``(from_position, entries returned)`` of every ``get_journal`` of a code-workflow
    activation, on whichever adapter the test runs."""
    from treadle.kernel.workflows import executor

    seen: list[tuple[int | None, int]] = []
    original = executor.WorkflowContext.resume

    def resume(self: Any, writer: Any, token: Any, overrides: Any, fresh: Any) -> None:
        seen.append((self.parked_at, len(fresh)))
        original(self, writer, token, overrides, fresh)

    monkeypatch.setattr(executor.WorkflowContext, "resume", resume)
    return seen


# -- the parked body is used ----------------------------------------------------------------
@BACKENDS
async def test_wake_ups_resume_the_parked_body_instead_of_replaying(
    engine: Engine, reads: list[tuple[int | None, int]]
) -> None:
    """Thirty signal wake-ups enter the body once: each resumes it where it waits, each
    step runs once, and each wake-up reads only the journal from the parked position on
    (the wait's entry), not the sixty entries the run has by then."""
    handle = await engine.start("ticks", 30)
    await drain(engine.kernel)
    for i in range(1, 31):
        await tick(engine, handle.run_id, i)
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == sum(range(1, 31))
    assert ENTERED == {"ticks": 1}
    assert CALLS == {"record": 30}
    assert cache(engine).hits == 30
    assert cache(engine).misses == 0
    assert len(cache(engine)) == 0  # the run ended: nothing stays parked
    assert len(await engine.journal(handle.run_id)) == 60
    # The wait at position 2k is read back alone: the entry the signal completed.
    assert reads == [(2 * k, 1) for k in range(30)]


@BACKENDS
async def test_another_kernel_ran_the_run_meanwhile_so_the_parked_body_is_stale(
    engine: Engine,
) -> None:
    """A wake-up run by another kernel (another worker) moves the run on: the first
    kernel's parked body no longer describes it, so its next activation there drops it
    and replays the journal, and no step runs twice."""
    other = twin(engine.kernel)
    handle = await engine.start("ticks", 3)
    await drain(engine.kernel)
    assert handle.run_id in cache(engine)
    await tick(engine, handle.run_id, 1, kernel=other)  # replays there, parks there
    assert ENTERED == {"ticks": 2}
    await tick(engine, handle.run_id, 2)  # back here: the parked body is one wake-up behind
    assert cache(engine).misses == 1
    assert cache(engine).hits == 0
    assert ENTERED == {"ticks": 3}
    await tick(engine, handle.run_id, 3)
    assert cache(engine).hits == 1
    run = await engine.get_run(handle.run_id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, 6)
    assert CALLS == {"record": 3}
    other.close()


@BACKENDS
async def test_cancel_drops_the_parked_body_which_cannot_journal_while_it_unwinds(
    engine: Engine,
) -> None:
    """Cancelling a run closes its parked body: its ``finally`` runs, but a ``ctx`` call
    there raises instead of running or journaling anything."""
    ENTERED["probe-finally"] = 1
    handle = await engine.start("ticks", 5)
    await drain(engine.kernel)
    await tick(engine, handle.run_id, 1)
    journal = await engine.journal(handle.run_id)
    assert handle.run_id in cache(engine)
    assert await engine.cancel(handle.run_id, reason="no longer needed")
    assert handle.run_id not in cache(engine)
    assert cache(engine).evictions == 1
    assert CLEANUP == ["Interrupt"]
    assert "cleanup" not in CALLS
    assert await engine.journal(handle.run_id) == journal
    assert cache(engine).close_errors == []
    assert (await engine.get_run(handle.run_id)).status is RunStatus.CANCELLED


@BACKENDS
async def test_a_crash_after_resuming_replays_exactly(engine: Engine, clock: FakeClock) -> None:
    """A worker crash inside a resumed body (``SimulatedCrash`` from a step) leaves
    nothing parked; the retried activation replays the journal from the top and resumes
    exactly: the crashed step runs again, the ones before it do not."""
    CRASH_AT["record"] = 3
    handle = await engine.start("ticks", 4)
    kernel = engine.kernel
    await drain(kernel)
    await tick(engine, handle.run_id, 1)
    await tick(engine, handle.run_id, 2)
    await engine.signal(handle.run_id, "tick", 3)
    (job,) = await kernel.deps.job_transport.dequeue("w1", clock.now())
    with pytest.raises(SimulatedCrash):
        await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))
    assert handle.run_id not in cache(engine)
    clock.advance(timedelta(minutes=5))
    reaped = await kernel.dispatch(c.LeaseReapStale(stale_threshold=timedelta(seconds=60)))
    assert reaped.released == 1
    clock.advance(timedelta(minutes=5))  # past the release backoff
    await drain(kernel, "w2")
    assert ENTERED == {"ticks": 2}
    assert CALLS == {"record": 4}  # the third ran twice: crashed, then again
    await tick(engine, handle.run_id, 4)
    run = await engine.get_run(handle.run_id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, 10)
    assert [e.attempts for e in await engine.journal(handle.run_id) if e.kind == "step"] == [
        1,
        1,
        1,
        1,
    ]


# -- eviction and the settings ----------------------------------------------------------------
async def test_the_least_recently_parked_body_is_evicted_and_its_run_replays() -> None:
    """With room for one parked body, parking a second evicts the first: that run's next
    wake-up replays from the journal, the other's resumes; both end right."""
    te = TestEngine([ticks], settings=KernelSettings(sticky_cache_size=1))
    first = await te.start("ticks", 2)
    await te.run_until_idle()
    second = await te.start("ticks", 2)
    await te.run_until_idle()
    assert (first.run_id in cache(te), second.run_id in cache(te)) == (False, True)
    assert cache(te).evictions == 1
    await te.signal(first.run_id, "tick", 1)
    await te.run_until_idle()  # replays, parks, evicts the second
    await te.signal(first.run_id, "tick", 2)
    await te.run_until_idle()  # resumed
    assert await first.result() == 3
    await te.signal(second.run_id, "tick", 5)
    await te.signal(second.run_id, "tick", 6)
    await te.run_until_idle()
    assert await second.result() == 11
    assert ENTERED == {"ticks": 4}  # each started once, each replayed once after eviction
    assert CALLS == {"record": 4}


async def test_kernel_close_drops_every_parked_body() -> None:
    """``Kernel.close`` (``Engine.aclose``) closes the parked bodies; their runs are
    untouched in storage and replay wherever they resume next."""
    ENTERED["probe-finally"] = 1
    te = TestEngine([ticks])
    handles = [await te.start("ticks", 1) for _ in range(3)]
    await te.run_until_idle()
    assert len(cache(te)) == 3
    te.kernel.close()
    assert len(cache(te)) == 0
    assert CLEANUP == ["Interrupt"] * 3
    for handle in handles:
        await te.signal(handle.run_id, "tick", 7)
    await te.run_until_idle()
    assert [await h.result() for h in handles] == [7, 7, 7]
    assert ENTERED["ticks"] == 6  # three started, three replayed after the close
    assert CALLS == {"record": 3, "cleanup": 3}  # the cleanups of the three normal ends


async def test_sticky_execution_off_replays_every_activation() -> None:
    """``KernelSettings(sticky_execution=False)``: nothing is parked and every wake-up
    re-runs the body from the top (the replay of DESIGN §3.2)."""
    te = TestEngine([ticks], settings=KernelSettings(sticky_execution=False))
    handle = await te.start("ticks", 3)
    await te.run_until_idle()
    for i in (1, 2, 3):
        await te.signal(handle.run_id, "tick", i)
        await te.run_until_idle()
    assert await handle.result() == 6
    assert ENTERED == {"ticks": 4}
    assert CALLS == {"record": 3}
    assert (len(cache(te)), cache(te).hits) == (0, 0)


# -- what can change under a parked body ------------------------------------------------------
async def test_a_fork_of_a_parked_run_replays_its_own_journal() -> None:
    """A fork is a new run: its first activation replays the copied journal (the parked
    body belongs to its source), and the source still resumes its own parked body."""
    te = TestEngine([ticks])
    source = await te.start("ticks", 3)
    await te.run_until_idle()
    for i in (1, 2):
        await te.signal(source.run_id, "tick", i)
        await te.run_until_idle()
    fork = await te.fork(source.run_id, "record#2")
    await te.run_until_idle()
    assert fork.run_id in cache(te)
    await te.signal(fork.run_id, "tick", 10)
    await te.signal(source.run_id, "tick", 3)
    await te.run_until_idle()
    assert await source.result() == 6
    assert await fork.result() == 13  # record #2 ran afresh on the copied signal: 1 + 2 + 10
    assert ENTERED == {"ticks": 2}
    assert cache(te).misses == 0


async def test_a_step_mocked_while_the_body_is_parked_applies_on_resume() -> None:
    """``TestEngine.mock_step`` applies to the next activation, parked body or not."""
    te = TestEngine([ticks])
    handle = await te.start("ticks", 2)
    await te.run_until_idle()
    await te.signal(handle.run_id, "tick", 1)
    await te.run_until_idle()
    mock = te.mock_step("record", lambda total: total * 100)
    await te.signal(handle.run_id, "tick", 2)
    await te.run_until_idle()
    assert await handle.result() == 300
    assert mock.call_count == 1
    assert ENTERED == {"ticks": 1}


async def test_a_changed_definition_sends_the_run_back_to_replay() -> None:
    """A parked body runs the code it started with; once the registry serves another
    definition object for the run's version, the parked body is dropped and replaced by
    a replay under the definition now registered."""
    te = TestEngine([ticks])
    handle = await te.start("ticks", 2)
    await te.run_until_idle()
    te.register(ticks)  # a fresh registration: the registry serves a new definition
    await te.signal(handle.run_id, "tick", 1)
    await te.run_until_idle()
    assert cache(te).misses == 1
    await te.signal(handle.run_id, "tick", 2)
    await te.run_until_idle()
    assert await handle.result() == 3
    assert ENTERED == {"ticks": 2}


async def test_a_waiting_ctx_all_unwinds_and_replays() -> None:
    """A body suspended on a ``ctx.all`` still waiting cannot park (its branch coroutines
    are gone once it unwinds): that wake-up replays, the waits after it park again."""

    @workflow(id="fan-in", input=int, output=list[int])
    async def fan_in(ctx: WorkflowContext, n: int) -> list[int]:
        _enter("fan-in")
        a, b = await ctx.all(ctx.wait_for_signal("a", int), ctx.wait_for_signal("b", int))
        c_ = await ctx.wait_for_signal("c", int)
        return [a, b, c_]

    te = TestEngine([fan_in])
    handle = await te.start("fan-in", 0)
    await te.run_until_idle()
    assert handle.run_id not in cache(te)
    await te.signal(handle.run_id, "a", 1)
    await te.signal(handle.run_id, "b", 2)
    await te.run_until_idle()
    assert handle.run_id in cache(te)  # now parked in the wait for "c"
    await te.signal(handle.run_id, "c", 3)
    await te.run_until_idle()
    assert await handle.result() == [1, 2, 3]
    assert ENTERED == {"fan-in": 2}


async def test_a_ctx_call_awaited_in_another_task_unwinds_and_replays() -> None:
    """Only the task driving the body can park it: a wait the body wraps in a task of its
    own (``asyncio.wait_for``) unwinds as without sticky execution, and replays."""

    @workflow(id="wrapped", input=int, output=int)
    async def wrapped(ctx: WorkflowContext, n: int) -> int:
        _enter("wrapped")
        got: int = await asyncio.wait_for(ctx.wait_for_signal("go", int), timeout=60)
        return got + await ctx.wait_for_signal("more", int)

    te = TestEngine([wrapped])
    handle = await te.start("wrapped", 0)
    await te.run_until_idle()
    assert handle.run_id not in cache(te)
    await te.signal(handle.run_id, "go", 1)
    await te.run_until_idle()
    assert handle.run_id in cache(te)  # the second wait is the body's own: parked
    await te.signal(handle.run_id, "more", 2)
    await te.run_until_idle()
    assert await handle.result() == 3
    assert ENTERED == {"wrapped": 2}


async def test_a_finally_that_awaits_cannot_finish_when_the_body_is_dropped() -> None:
    """Closing a parked body whose ``finally`` awaits (not a ``ctx`` call) stops at that
    await (a closing coroutine cannot wait); the eviction goes through and the run,
    untouched, replays."""

    @workflow(id="lingers", input=int, output=int)
    async def lingers(ctx: WorkflowContext, n: int) -> int:
        try:
            return await ctx.wait_for_signal("go", int)
        finally:
            CLEANUP.append("started")
            await asyncio.sleep(0)
            CLEANUP.append("finished")

    te = TestEngine([lingers])
    handle = await te.start("lingers", 0)
    await te.run_until_idle()
    assert te.kernel.deps.sticky.evict(handle.run_id)
    assert CLEANUP == ["started"]
    await te.signal(handle.run_id, "go", 5)
    await te.run_until_idle()
    assert await handle.result() == 5
    assert CLEANUP == ["started", "started", "finished"]


# -- the same results with the cache on and off ------------------------------------------------
class Item(BaseModel):
    sku: str
    qty: int


FLAKY: dict[str, int] = {}


async def reserve(item: Item) -> str:
    CALLS["reserve"] = CALLS.get("reserve", 0) + 1
    return f"{item.sku}x{item.qty}"


async def flaky(n: int) -> int:
    FLAKY["calls"] = FLAKY.get("calls", 0) + 1
    if FLAKY["calls"] % 2:
        raise ConnectionError("try again")
    return n


@workflow(id="child-doubler", input=int, output=int)
async def child_doubler(ctx: WorkflowContext, n: int) -> int:
    await ctx.sleep(timedelta(minutes=1))
    return n * 2


@workflow(id="everything", input=Item, output=dict[str, Any])
async def everything(ctx: WorkflowContext, item: Item) -> dict[str, Any]:
    """Every kind of wait: steps, a retry backoff, sleeps, signals with and without a
    timeout, an update, a child, a review, journaled now/publish/attribute, ctx.all."""
    started = ctx.now()
    ref = await ctx.step("reserve", reserve, item)
    ctx.publish("phase", "reserved")
    ctx.set_attribute("sku", item.sku)
    retried = await ctx.step(
        "flaky", flaky, 5, retry=RetryPolicy(max_attempts=3, initial_delay=timedelta(minutes=2))
    )
    await ctx.sleep(timedelta(hours=1))
    first = await ctx.wait_for_signal("go", int)
    try:
        await ctx.wait_for_signal("never", timeout=timedelta(minutes=30))
        timed_out = False
    except Exception:  # WaitTimeoutError, the expected outcome
        timed_out = True
    update = await ctx.wait_for_update("bump", int)
    await update.reply(update.payload + first)
    doubled = await ctx.child("child-doubler", first)
    decision = await ctx.review({"ref": ref}, reviewers=["ann"])
    pair = await ctx.all(ctx.step("reserve", reserve, item), ctx.sleep(timedelta(minutes=5)))
    elapsed = (ctx.now() - started).total_seconds()
    return {
        "ref": ref,
        "retried": retried,
        "first": first,
        "timed_out": timed_out,
        "update": update.payload,
        "doubled": doubled,
        "decision": decision.decision,
        "pair": pair[0],
        "elapsed": elapsed,
    }


async def _run_everything(sticky: bool) -> tuple[Any, list[tuple[Any, ...]], list[str], int]:
    FLAKY.clear()
    te = TestEngine([everything, child_doubler], settings=KernelSettings(sticky_execution=sticky))
    handle = await te.start("everything", {"sku": "A-1", "qty": 2})
    await te.run_until_idle()
    await te.advance_time(timedelta(minutes=2))  # the retry backoff
    await te.advance_time(timedelta(hours=1))  # the sleep
    await te.signal(handle.run_id, "go", 4)
    await te.run_until_idle()
    await te.advance_time(timedelta(minutes=30))  # the timeout of "never"
    update = await te.update(handle.run_id, "bump", 10)
    assert update == 14
    await te.run_until_idle()
    await te.advance_time(timedelta(minutes=1))  # the child's sleep
    (review,) = [e for e in await te.journal(handle.run_id) if e.kind == "review"]
    await te.dispatch(
        c.ReviewDecide(
            workflow_run_id=handle.run_id,
            review_id=str((review.input or {})["review_id"]),
            decision="approved",
            reviewer="ann",
        )
    )
    await te.run_until_idle()
    await te.advance_time(timedelta(minutes=5))
    output = await handle.result()
    journal = [_shape(e) for e in await te.journal(handle.run_id)]
    events = [e.type for e in te.events if e.workflow_run_id == handle.run_id]  # type: ignore[attr-defined]
    return output, journal, events, cache(te).hits


def _shape(entry: JournalEntry) -> tuple[Any, ...]:
    """An entry without its ids, nor the ids a result holds that come from the id port
    (fresh uuids on each engine: an update's, a review's, the run's in a child's)."""
    result = entry.result
    if isinstance(result, dict):
        fresh = ("update_id", "review_id", "child_run_id")
        result = {k: v for k, v in result.items() if k not in fresh}
    return (entry.position, entry.name, entry.occurrence, entry.kind, entry.status, result)


async def test_results_are_the_same_with_the_cache_on_and_off() -> None:
    """The same run with sticky execution on and off ends with the same output, the same
    journal (positions, names, statuses, results) and the same events, in order."""
    on = await _run_everything(sticky=True)
    calls_on = dict(CALLS)
    CALLS.clear()
    off = await _run_everything(sticky=False)
    assert on[:3] == off[:3]
    assert on[0]["timed_out"] is True
    assert on[0]["decision"] == "approved"
    assert CALLS == calls_on == {"reserve": 2}
    assert on[3] > 0  # the sticky run did resume parked bodies
    assert off[3] == 0


# -- the cache itself ---------------------------------------------------------------------------
def test_an_unstarted_or_finished_body_closes_cleanly() -> None:
    """``Body.close`` on a body that never ran, or ran to its end, does nothing harmful."""
    from treadle.kernel.workflows.sticky import Body

    async def returns() -> int:
        return 1

    body = Body(returns())
    assert body.close() is None
    assert body.finished
