"""Composition in code workflows (issue 5, requirement 6) on the TestEngine: ``ctx.all``,
``ctx.race`` and ``ctx.child``, their journal positions across replays, failures,
suspensions inside a group, and the cancel cascade from a parent to its descendants."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    ChildWorkflowFailedError,
    NonRetryableError,
    RetryPolicy,
    RunStatus,
    StepFailedError,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel import WorkflowBuilder
from treadle.kernel.errors import InvalidInputError, RunFailedError, WorkflowNotFoundError
from treadle.kernel.model import RunFilter
from treadle.kernel.workflows import JournalStatus
from treadle.testing import SimulatedCrash, TestEngine, with_chaos


class Order(BaseModel):
    n: int


class Quote(BaseModel):
    n: int
    price: int


CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()


async def double(n: int) -> int:
    _count("double")
    return n * 2


async def triple(n: int) -> int:
    _count("triple")
    return n * 3


async def refuse(n: int) -> int:
    _count("refuse")
    raise NonRetryableError(f"no {n}")


def _kinds(journal: list[Any]) -> list[tuple[int, str, str, JournalStatus]]:
    return [(e.position, e.kind, e.name, e.status) for e in journal]


async def _live_timers(te: TestEngine, run_id: str) -> list[Any]:
    async with te.persistence.transaction() as tx:
        return await tx.timers.pending(run_id)


# -- ctx.all -------------------------------------------------------------------------------------
async def test_all_runs_steps_concurrently_and_returns_results_in_argument_order() -> None:
    """Both steps run at the same time (each waits for the other to start); the results
    come back in argument order and the journal holds them at positions in argument order."""
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def meet(me: str, other: str) -> str:
        started[me].set()
        await asyncio.wait_for(started[other].wait(), 5)  # deadlocks if run one by one
        return me.upper()

    @workflow(id="pair", input=Order, output=list[str])
    async def pair(ctx: WorkflowContext, order: Order) -> list[str]:
        first, second = await ctx.all(ctx.step("b", meet, "b", "a"), ctx.step("a", meet, "a", "b"))
        tail: int = await ctx.step("tail", double, order.n)
        return [first, second, str(tail)]

    te = TestEngine([pair])
    handle = await te.start("pair", {"n": 2})
    assert await handle.result() == ["B", "A", "4"]
    assert _kinds(await te.journal(handle.run_id)) == [
        (0, "step", "b", JournalStatus.COMPLETED),
        (1, "step", "a", JournalStatus.COMPLETED),
        (2, "step", "tail", JournalStatus.COMPLETED),
    ]


async def test_a_retry_backoff_in_one_branch_suspends_while_the_other_completes() -> None:
    """One branch failing with a long backoff does not hold back its sibling: the sibling's
    step commits, the run suspends without a worker, and after the backoff only the failed
    branch runs again."""
    attempts: list[int] = []

    async def flaky(n: int) -> int:
        info = WorkflowContext.current_step()
        assert info is not None
        attempts.append(info.attempt)
        if info.attempt == 1:
            raise ConnectionError("upstream down")
        return n + 1

    policy = RetryPolicy(
        max_attempts=3, initial_delay=timedelta(minutes=10), max_delay=timedelta(minutes=10)
    )

    @workflow(id="group", input=Order, output=list[int])
    async def group(ctx: WorkflowContext, order: Order) -> list[int]:
        values: list[int] = await ctx.all(
            ctx.step("flaky", flaky, order.n, retry=policy), ctx.step("double", double, order.n)
        )
        return values

    te = TestEngine([group])
    handle = await te.start("group", {"n": 5})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    assert te.job_transport.has_leased() is False
    assert _kinds(await te.journal(handle.run_id)) == [
        (0, "step", "flaky", JournalStatus.RETRYING),
        (1, "step", "double", JournalStatus.COMPLETED),
    ]
    await te.advance_time(timedelta(minutes=10))
    assert await handle.result() == [6, 10]
    assert attempts == [1, 2]
    assert CALLS == {"double": 1}


async def test_all_waits_for_every_branch_then_raises_the_first_failure() -> None:
    """A branch failing for good does not cut its siblings short: the run waits for the
    sleeping branch, then the body receives the first failure in argument order."""

    @workflow(id="settle", input=Order, output=str)
    async def settle(ctx: WorkflowContext, order: Order) -> str:
        try:
            await ctx.all(
                ctx.step("double", double, order.n),
                ctx.sleep(timedelta(hours=1)),
                ctx.step("refuse", refuse, order.n),
                ctx.step("refuse-again", refuse, order.n + 1),
            )
        except StepFailedError as exc:
            return f"{exc.step}: {exc.error}"
        return "all fine"

    te = TestEngine([settle])
    handle = await te.start("settle", {"n": 1})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    await te.advance_time(timedelta(hours=1))
    assert await handle.result() == "refuse: NonRetryableError: no 1"
    assert CALLS == {"double": 1, "refuse": 2}  # each branch ran once, none on replay


async def test_an_uncaught_failure_inside_all_fails_the_run_naming_the_step() -> None:
    """Uncaught, the first failure of a group fails the run like a failed step does."""

    @workflow(id="fails", input=Order)
    async def fails(ctx: WorkflowContext, order: Order) -> None:
        await ctx.all(ctx.step("ok", double, 1), ctx.step("refuse", refuse, order.n))

    te = TestEngine([fails])
    handle = await te.start("fails", {"n": 3})
    with pytest.raises(RunFailedError, match="step 'refuse' #1"):
        await handle.result()


async def test_arguments_that_are_not_single_ctx_calls_are_refused() -> None:
    """A coroutine making two ctx calls (positions would depend on timing) fails the run
    with an error saying each argument must be one ctx call; a non-coroutine is refused."""

    @workflow(id="misuse", input=Order)
    async def misuse(ctx: WorkflowContext, order: Order) -> None:
        async def two() -> None:
            await ctx.step("one", double, 1)
            await ctx.step("two", double, 2)

        await ctx.all(two(), ctx.step("other", double, 3))

    @workflow(id="not-a-call", input=Order)
    async def not_a_call(ctx: WorkflowContext, order: Order) -> None:
        await ctx.all(ctx.step("fine", double, 1), 42)  # type: ignore[arg-type]

    te = TestEngine([misuse, not_a_call])
    first = await te.start("misuse", {"n": 1})
    with pytest.raises(RunFailedError, match="must be one ctx call"):
        await first.result()
    second = await te.start("not-a-call", {"n": 1})
    with pytest.raises(RunFailedError, match="argument 1 must be a ctx call"):
        await second.result()
    assert "fine" not in CALLS


async def test_empty_nested_and_call_free_groups_are_refused_or_trivial() -> None:
    """ctx.all() is []; ctx.race() refuses with no argument; nesting a group in a group and
    an argument that makes no ctx call are refused, naming the problem."""
    outcomes: list[str] = []

    async def no_call() -> int:
        return 1

    @workflow(id="odd-groups", input=Order, output=list[str])
    async def odd_groups(ctx: WorkflowContext, order: Order) -> list[str]:
        outcomes.append(repr(await ctx.all()))
        try:
            await ctx.race()
        except ValueError as exc:
            outcomes.append(str(exc))
        try:
            await ctx.all(ctx.all(ctx.step("inner", double, 1)))
        except TypeError as exc:
            outcomes.append(str(exc))
        await ctx.all(no_call())
        return outcomes  # pragma: no cover - the call-free argument fails the run

    te = TestEngine([odd_groups])
    handle = await te.start("odd-groups", {"n": 1})
    with pytest.raises(
        RunFailedError, match=r"argument 0 of ctx\.all / ctx\.race made no ctx call"
    ):
        await handle.result()
    assert outcomes[0] == "[]"
    assert "ctx.race needs at least one argument" in outcomes[1]
    assert "ctx.all cannot be an argument of another ctx.all / ctx.race" in outcomes[2]
    assert "inner" not in CALLS


# -- ctx.race ------------------------------------------------------------------------------------
async def test_race_with_a_sleep_is_a_timeout_and_the_loser_never_runs_again() -> None:
    """race(step, sleep): the sleep wins while the step waits for its retry; the step's
    entry is CANCELLED, its retry timer disarmed, and it is never attempted again."""
    attempts: list[int] = []

    async def slow_gateway(n: int) -> int:
        attempts.append(n)
        raise ConnectionError("gateway timeout")

    policy = RetryPolicy(
        max_attempts=5, initial_delay=timedelta(hours=2), max_delay=timedelta(hours=2)
    )

    @workflow(id="deadline", input=Order, output=str)
    async def deadline(ctx: WorkflowContext, order: Order) -> str:
        index, value = await ctx.race(
            ctx.step("charge", slow_gateway, order.n, retry=policy),
            ctx.sleep(timedelta(hours=1), name="deadline"),
        )
        if index == 1:
            return "timed out"
        return f"charged {value}"

    te = TestEngine([deadline])
    handle = await te.start("deadline", {"n": 7})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    await te.advance_time(timedelta(hours=1))
    assert await handle.result() == "timed out"
    await te.advance_time(timedelta(hours=5))
    assert attempts == [7]
    journal = await te.journal(handle.run_id)
    assert _kinds(journal) == [
        (0, "race", "race:race", JournalStatus.COMPLETED),
        (1, "step", "charge", JournalStatus.CANCELLED),
        (2, "sleep", "sleep:deadline", JournalStatus.COMPLETED),
    ]
    assert journal[0].result == {"winner": 1, "branches": 2}
    assert await _live_timers(te, handle.run_id) == []


async def test_race_won_by_a_step_needs_no_timer() -> None:
    """A step finishing first wins at once: the run completes without the clock moving and
    the losing sleep never leaves a timer behind."""

    @workflow(id="quick", input=Order, output=list[Any])
    async def quick(ctx: WorkflowContext, order: Order) -> list[Any]:
        index, value = await ctx.race(
            ctx.step("double", double, order.n), ctx.sleep(timedelta(days=1))
        )
        return [index, value]

    te = TestEngine([quick])
    handle = await te.start("quick", {"n": 4})
    assert await handle.result() == [0, 8]
    assert await _live_timers(te, handle.run_id) == []


async def test_a_decided_race_replays_the_same_winner_even_when_a_loser_is_ready() -> None:
    """Once signal 'b' won, a later activation returns 'b' again although signal 'a' is now
    in the inbox; the loser never consumes it, so a later wait still gets it."""

    @workflow(id="first-signal", input=Order, output=list[Any])
    async def first_signal(ctx: WorkflowContext, order: Order) -> list[Any]:
        index, payload = await ctx.race(ctx.wait_for_signal("a"), ctx.wait_for_signal("b"))
        await ctx.wait_for_signal("go")
        late = await ctx.wait_for_signal("a")
        return [index, payload, late]

    te = TestEngine([first_signal])
    handle = await te.start("first-signal", {"n": 1})
    await te.run_until_idle()
    await te.signal(handle.run_id, "b", "from b")
    await te.run_until_idle()
    await te.signal(handle.run_id, "a", "from a")  # would win a fresh race now
    await te.run_until_idle()
    await te.signal(handle.run_id, "go")
    assert await handle.result() == [1, "from b", "from a"]
    journal = await te.journal(handle.run_id)
    assert [(e.kind, e.name, e.status) for e in journal[:3]] == [
        ("race", "race:race", JournalStatus.COMPLETED),
        ("signal", "signal:a", JournalStatus.CANCELLED),
        ("signal", "signal:b", JournalStatus.COMPLETED),
    ]


async def test_a_losing_step_is_cancelled_mid_call_and_never_journaled_as_completed() -> None:
    """When one step wins, a sibling still running has its function cancelled; the loser
    leaves no completed result, and the race entry names the winner."""
    seen: list[str] = []

    async def hangs(n: int) -> int:
        try:
            await asyncio.Event().wait()  # never set
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return n  # pragma: no cover

    @workflow(id="fastest", input=Order, output=list[Any])
    async def fastest(ctx: WorkflowContext, order: Order) -> list[Any]:
        index, value = await ctx.race(
            ctx.step("hangs", hangs, order.n), ctx.step("double", double, order.n)
        )
        return [index, value]

    te = TestEngine([fastest])
    handle = await te.start("fastest", {"n": 21})
    assert await handle.result() == [1, 42]
    assert seen == ["cancelled"]
    journal = await te.journal(handle.run_id)
    assert _kinds(journal) == [
        (0, "race", "race:race", JournalStatus.COMPLETED),
        (2, "step", "double", JournalStatus.COMPLETED),
    ]
    assert journal[0].result == {"winner": 1, "branches": 2}


async def test_race_raises_the_winners_error() -> None:
    """A branch failing first wins the race: its error is raised in the body."""

    @workflow(id="bad-race", input=Order, output=str)
    async def bad_race(ctx: WorkflowContext, order: Order) -> str:
        try:
            await ctx.race(ctx.step("refuse", refuse, order.n), ctx.sleep(timedelta(hours=1)))
        except StepFailedError as exc:
            return f"lost: {exc.step}"
        return "won"

    te = TestEngine([bad_race])
    handle = await te.start("bad-race", {"n": 1})
    assert await handle.result() == "lost: refuse"


# -- ctx.child -----------------------------------------------------------------------------------
@workflow(id="quote", input=Order, output=Quote)
async def quote(ctx: WorkflowContext, order: Order) -> Quote:
    await ctx.sleep(timedelta(minutes=30))
    price: int = await ctx.step("price", triple, order.n)
    return Quote(n=order.n, price=price)


@workflow(id="shop", input=Order, output=list[int])
async def shop(ctx: WorkflowContext, order: Order) -> list[int]:
    got: Quote = await ctx.child("quote", {"n": order.n})
    assert isinstance(got, Quote)  # typed with the child's output model, also on replay
    return [got.n, got.price]


async def test_child_runs_as_its_own_linked_run_and_returns_its_typed_output() -> None:
    """ctx.child creates a run of its own with parent_run_id set; the parent waits
    SUSPENDED (no worker held) until the child ends, then gets the child's output."""
    te = TestEngine([shop, quote])
    handle = await te.start("shop", {"n": 2})
    await te.run_until_idle()
    (child,) = await te.kernel.reads.list_runs(RunFilter(parent_run_id=handle.run_id))
    assert child.workflow_id == "quote"
    assert child.status is RunStatus.SUSPENDED
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    assert te.job_transport.has_leased() is False
    await te.advance_time(timedelta(minutes=30))
    assert await handle.result() == [2, 6]
    assert (await te.get_run(child.id)).parent_run_id == handle.run_id
    parent_events = [e for e in te.events if e.workflow_run_id == handle.run_id]
    types = [e.type for e in parent_events]  # type: ignore[attr-defined]
    assert types.index("child:started") < types.index("child:finished")
    finished = next(e for e in parent_events if e.type == "child:finished")  # type: ignore[attr-defined]
    assert finished.child_run_id == child.id  # type: ignore[attr-defined]
    assert finished.status == "COMPLETED"  # type: ignore[attr-defined]
    journal = await te.journal(handle.run_id)
    assert _kinds(journal) == [(0, "child", "child:quote", JournalStatus.COMPLETED)]


async def test_a_stage_pipeline_can_be_a_child() -> None:
    """A pipeline child runs its stages and returns its last stage's typed output; a
    failing pipeline child raises ChildWorkflowFailedError with the stage's error."""

    @define_stage(id="price-it", input=Order, output=Quote)
    async def price_it(ctx: Any) -> Quote:
        return Quote(n=ctx.input.n, price=ctx.input.n * 100)

    pricing = WorkflowBuilder("pricing", input=Order).pipe(price_it).build()

    @workflow(id="uses-pipeline", input=Order, output=int)
    async def uses_pipeline(ctx: WorkflowContext, order: Order) -> int:
        got: Quote = await ctx.child("pricing", order)
        return got.price

    @define_stage(id="reject-it", input=Order, output=Quote)
    async def reject_it(ctx: Any) -> Quote:
        raise NonRetryableError("out of stock")

    rejecting = WorkflowBuilder("rejecting", input=Order).pipe(reject_it).build()

    @workflow(id="uses-failing-pipeline", input=Order, output=str)
    async def uses_failing_pipeline(ctx: WorkflowContext, order: Order) -> str:
        try:
            await ctx.child("rejecting", order)
        except ChildWorkflowFailedError as exc:
            return f"{exc.workflow_id} {exc.status}: {exc.error}"
        return "bought"  # pragma: no cover

    te = TestEngine([uses_pipeline, pricing, uses_failing_pipeline, rejecting])
    handle = await te.start("uses-pipeline", {"n": 3})
    assert await handle.result() == 300
    failing = await te.start("uses-failing-pipeline", {"n": 3})
    outcome = await failing.result()
    assert outcome.startswith("rejecting FAILED: stage 'reject-it' failed")
    assert "out of stock" in outcome


@workflow(id="breaks", input=Order, output=int)
async def breaks(ctx: WorkflowContext, order: Order) -> int:
    value: int = await ctx.step("refuse", refuse, order.n)
    return value


@workflow(id="waits-forever", input=Order)
async def waits_forever(ctx: WorkflowContext, order: Order) -> None:
    await ctx.wait_for_signal("never")


@workflow(id="careful", input=Order, output=str)
async def careful(ctx: WorkflowContext, order: Order) -> str:
    child = "breaks" if order.n else "waits-forever"
    try:
        await ctx.child(child, {"n": order.n})
    except ChildWorkflowFailedError as exc:
        return f"{exc.status}: {exc.error}"
    return "fine"


async def test_a_failed_or_cancelled_child_raises_a_typed_error_the_parent_catches() -> None:
    """A child that fails raises ChildWorkflowFailedError (status, error) in the parent;
    a child cancelled by someone else does too, with its reason."""
    te = TestEngine([careful, breaks, waits_forever])
    failing = await te.start("careful", {"n": 5})
    assert await failing.result() == (
        "FAILED: StepFailedError: step 'refuse' #1 failed after 1 attempt(s): "
        "NonRetryableError: no 5"
    )
    cancelled = await te.start("careful", {"n": 0})
    await te.run_until_idle()
    (child,) = await te.kernel.reads.list_runs(RunFilter(parent_run_id=cancelled.run_id))
    assert await te.cancel(child.id, reason="not needed")
    assert await cancelled.result() == "CANCELLED: not needed"


async def test_an_unknown_child_workflow_or_bad_input_fails_the_parent_and_creates_nothing() -> (
    None
):
    """The child's workflow id and input are checked before anything is written; uncaught,
    the error (naming the workflow or the field) fails the parent."""

    @workflow(id="typo", input=Order)
    async def typo(ctx: WorkflowContext, order: Order) -> None:
        await ctx.child("no-such-workflow", {"n": 1})

    @workflow(id="bad-input", input=Order)
    async def bad_input(ctx: WorkflowContext, order: Order) -> None:
        await ctx.child("quote", {"n": "many"})

    @workflow(id="catches", input=Order, output=str)
    async def catches(ctx: WorkflowContext, order: Order) -> str:
        try:
            await ctx.child("quote", {"wrong": 1})
        except InvalidInputError as exc:
            return str(exc.errors[0][0])
        return "created"

    te = TestEngine([typo, bad_input, catches, quote])
    first = await te.start("typo", {"n": 1})
    with pytest.raises(RunFailedError, match="no-such-workflow"):
        await first.result()
    second = await te.start("bad-input", {"n": 1})
    with pytest.raises(RunFailedError, match=r"input\.n"):
        await second.result()
    third = await te.start("catches", {"n": 1})
    assert await third.result() == "input.n"
    assert {r.workflow_id for r in await te.kernel.reads.list_runs()} == {
        "typo",
        "bad-input",
        "catches",
    }
    assert WorkflowNotFoundError.__name__ in (await te.get_run(first.run_id)).error  # type: ignore[operator]


async def test_a_crash_after_the_child_was_created_never_creates_a_second_child() -> None:
    """The parent dies after committing its child entry (and so the child run); the replay
    finds the entry, waits for that same child and completes with its output."""
    crashes: list[int] = []

    async def boom(n: int) -> int:
        if not crashes:
            for _ in range(100):  # let the sibling branch commit the child first
                if await te.kernel.reads.list_runs(RunFilter(parent_run_id=handle.run_id)):
                    break
                await asyncio.sleep(0)
            else:
                raise AssertionError("the child was never created")
            crashes.append(n)
            raise SimulatedCrash
        return n

    @workflow(id="crashes-once", input=Order, output=list[Any])
    async def crashes_once(ctx: WorkflowContext, order: Order) -> list[Any]:
        got, n = await ctx.all(ctx.child("quote", {"n": order.n}), ctx.step("boom", boom, 1))
        return [got.price, n]

    te = TestEngine([crashes_once, quote])
    handle = await te.start("crashes-once", {"n": 4})
    with pytest.raises(SimulatedCrash):
        await te.run_until_idle()
    await te.advance_time(timedelta(minutes=31))  # lease reaped, child's sleep over
    assert await handle.result() == [12, 1]
    children = await te.kernel.reads.list_runs(RunFilter(parent_run_id=handle.run_id))
    assert len(children) == 1
    assert CALLS == {"triple": 1}


@workflow(id="grandchild", input=Order)
async def grandchild(ctx: WorkflowContext, order: Order) -> None:
    await ctx.sleep(timedelta(days=1))
    await ctx.step("late", double, order.n)


@workflow(id="middle", input=Order)
async def middle(ctx: WorkflowContext, order: Order) -> None:
    await ctx.all(ctx.child("grandchild", order), ctx.child("grandchild", order))


@workflow(id="top", input=Order)
async def top(ctx: WorkflowContext, order: Order) -> None:
    await ctx.child("middle", order)


async def test_cancelling_the_parent_cancels_children_and_grandchildren() -> None:
    """run.cancel on the top run cancels, in the same call, every descendant still live;
    none of them resumes when its timer would have fired."""
    te = TestEngine([top, middle, grandchild])
    handle = await te.start("top", {"n": 1})
    await te.run_until_idle()
    runs = await te.kernel.reads.list_runs()
    assert len(runs) == 4
    assert all(r.status is RunStatus.SUSPENDED for r in runs)
    assert await te.cancel(handle.run_id, reason="customer left")
    runs = await te.kernel.reads.list_runs()
    assert {r.status for r in runs} == {RunStatus.CANCELLED}
    (mid,) = [r for r in runs if r.workflow_id == "middle"]
    assert mid.error == f"parent run {handle.run_id!r} ended CANCELLED"
    grandchildren = [r for r in runs if r.workflow_id == "grandchild"]
    assert [r.parent_run_id for r in grandchildren] == [mid.id, mid.id]
    await te.advance_time(timedelta(days=2))
    assert "double" not in CALLS
    cancelled = [e.workflow_run_id for e in te.events if e.type == "workflow:cancelled"]  # type: ignore[attr-defined]
    assert sorted(cancelled) == sorted(r.id for r in runs)


async def test_a_child_that_loses_a_race_is_cancelled() -> None:
    """race(child, sleep) as a deadline for a child: when the sleep wins, the child run is
    cancelled in the same transaction that records the winner."""

    @workflow(id="deadline-child", input=Order, output=int)
    async def deadline_child(ctx: WorkflowContext, order: Order) -> int:
        index, _ = await ctx.race(
            ctx.child("grandchild", order), ctx.sleep(timedelta(hours=1), name="deadline")
        )
        return index

    te = TestEngine([deadline_child, grandchild])
    handle = await te.start("deadline-child", {"n": 1})
    await te.advance_time(timedelta(hours=1))
    assert await handle.result() == 1
    (child,) = await te.kernel.reads.list_runs(RunFilter(parent_run_id=handle.run_id))
    assert child.status is RunStatus.CANCELLED
    await te.advance_time(timedelta(days=2))
    assert "double" not in CALLS


async def test_a_child_that_wins_a_race_returns_its_typed_output_and_disarms_the_deadline() -> None:
    """race(child, sleep) won by the child: the parent gets the child's typed output and
    the deadline's timer is disarmed."""

    @workflow(id="child-in-time", input=Order, output=int)
    async def child_in_time(ctx: WorkflowContext, order: Order) -> int:
        index, got = await ctx.race(
            ctx.child("quote", order), ctx.sleep(timedelta(hours=1), name="deadline")
        )
        assert index == 0
        assert isinstance(got, Quote)
        return got.price

    te = TestEngine([child_in_time, quote])
    handle = await te.start("child-in-time", {"n": 5})
    await te.advance_time(timedelta(minutes=30))  # the child's own 30-minute sleep
    assert await handle.result() == 15
    assert await _live_timers(te, handle.run_id) == []
    assert [e.status for e in await te.journal(handle.run_id)] == [
        JournalStatus.COMPLETED,
        JournalStatus.COMPLETED,
        JournalStatus.CANCELLED,
    ]


async def test_chaos_commit_failures_never_duplicate_children_or_branch_results() -> None:
    """Under injected commit failures, groups of steps and children still complete with the
    right output: one child run per ctx.child position, one journal entry per call."""

    @workflow(id="chaotic-parent", input=Order, output=list[int])
    async def chaotic_parent(ctx: WorkflowContext, order: Order) -> list[int]:
        totals: list[int] = []
        for i in range(order.n):
            kid, doubled = await ctx.all(
                ctx.child("quote", {"n": i}), ctx.step("double", double, i)
            )
            totals.append(kid.price + doubled)
        index, _ = await ctx.race(ctx.step("double", double, 100), ctx.sleep(timedelta(days=1)))
        totals.append(index)
        return totals

    te = TestEngine([chaotic_parent, quote], chaos=with_chaos(0.15, seed=5))
    handle = await te.start("chaotic-parent", {"n": 4})
    for _ in range(200):
        await te.advance_time(timedelta(minutes=10))
        if te.persistence.runs[handle.run_id].status.terminal:  # read past the chaos
            break
    assert te.chaos is not None
    assert te.chaos.injected > 0
    te.chaos.fail_rate = 0.0  # the checks below read through the kernel
    assert await handle.result() == [5 * i for i in range(4)] + [0]
    children = await te.kernel.reads.list_runs(RunFilter(parent_run_id=handle.run_id))
    assert len(children) == 4
    journal = await te.journal(handle.run_id)
    keys = [(e.name, e.occurrence) for e in journal]
    assert len(keys) == len(set(keys)) == 4 * 2 + 2  # the race and its winner; no sleep


async def test_a_run_with_a_decided_race_and_a_child_can_be_forked_after_them() -> None:
    """Forking from a step after a race and a child reuses both from the journal: the
    race's loser (CANCELLED) and the child's outcome are copied, no new child is created,
    and only the step after them runs again."""

    @workflow(id="forkable", input=Order, output=list[Any])
    async def forkable(ctx: WorkflowContext, order: Order) -> list[Any]:
        index, _ = await ctx.race(ctx.wait_for_signal("never"), ctx.step("double", double, order.n))
        got: Quote = await ctx.child("quote", order)
        last: int = await ctx.step("triple", triple, got.price)
        return [index, last]

    te = TestEngine([forkable, quote])
    source = await te.start("forkable", {"n": 1})
    await te.advance_time(timedelta(minutes=30))
    assert await source.result() == [1, 9]
    fork = await te.fork(source.run_id, "triple")
    assert await fork.result() == [1, 9]
    assert CALLS == {"double": 1, "triple": 3}  # the child's price step, then two "triple"
    assert await te.kernel.reads.list_runs(RunFilter(parent_run_id=fork.run_id)) == []


async def test_a_child_cancelled_with_its_parent_runs_its_saga_compensations() -> None:
    """The cancel cascade cancels a child as run.cancel does: the child's registered
    compensations still run, as durable steps."""

    async def unbook(n: int) -> None:
        _count("unbook")

    @workflow(id="booking", input=Order)
    async def booking(ctx: WorkflowContext, order: Order) -> None:
        saga = ctx.saga()
        await ctx.step("book", double, order.n)
        saga.add("unbook", unbook, order.n)
        await ctx.sleep(timedelta(days=1))

    @workflow(id="trip", input=Order)
    async def trip(ctx: WorkflowContext, order: Order) -> None:
        await ctx.child("booking", order)

    te = TestEngine([trip, booking])
    handle = await te.start("trip", {"n": 1})
    await te.run_until_idle()
    (child,) = await te.kernel.reads.list_runs(RunFilter(parent_run_id=handle.run_id))
    assert await te.cancel(handle.run_id, reason="trip called off")
    await te.run_until_idle()
    assert (await te.get_run(child.id)).status is RunStatus.CANCELLED
    assert CALLS == {"double": 1, "unbook": 1}


async def test_compensating_after_cancel_replays_past_a_decided_race() -> None:
    """A cancelled run's compensating replay passes a decided race (its loser is skipped,
    not taken for an unfinished call), so compensations registered after it still run."""

    async def unbook(n: int) -> None:
        _count("unbook")

    @workflow(id="raced-saga", input=Order)
    async def raced_saga(ctx: WorkflowContext, order: Order) -> None:
        saga = ctx.saga()
        await ctx.race(ctx.wait_for_signal("never"), ctx.step("double", double, order.n))
        await ctx.step("book", triple, order.n)
        saga.add("unbook", unbook, order.n)
        await ctx.sleep(timedelta(days=1))

    te = TestEngine([raced_saga])
    handle = await te.start("raced-saga", {"n": 1})
    await te.run_until_idle()
    assert await te.cancel(handle.run_id, reason="stop")
    await te.run_until_idle()
    assert CALLS == {"double": 1, "triple": 1, "unbook": 1}
