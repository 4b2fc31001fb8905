"""Code workflows (DESIGN §3.2) on the TestEngine: registration, steps and the journal,
retries, durable time, signals, queries, mocks and crash-exact resume."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, RunStatus, StepFailedError, WorkflowContext, workflow
from treadle.kernel.errors import (
    InvalidPayloadError,
    InvalidStateError,
    NotSupportedError,
    RunFailedError,
    TransientStorageError,
    WaitTimeoutError,
)
from treadle.kernel.kernel import KernelSettings
from treadle.kernel.workflows import WORKFLOW_STAGE_ID, CodeWorkflowDefinition, JournalStatus
from treadle.testing import SimulatedCrash, TestEngine, with_chaos


def replaying() -> KernelSettings:
    """Sticky execution off: every activation replays the body from the top, which is
    what the tests of replay itself (and of a changed body) look at."""
    return KernelSettings(sticky_execution=False)


class Order(BaseModel):
    n: int


class Receipt(BaseModel):
    total: int
    note: str = ""


class Approval(BaseModel):
    approved: bool
    by: str = "someone"


CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()


async def charge(n: int) -> int:
    _count("charge")
    return n * 10


def ship(total: int) -> Receipt:  # sync: runs off the event loop
    _count("ship")
    return Receipt(total=total, note="shipped")


@workflow(id="checkout", input=Order, output=Receipt, version="2")
async def checkout(ctx: WorkflowContext, order: Order) -> Receipt:
    total = await ctx.step("charge", charge, order.n)
    receipt: Receipt = await ctx.step("ship", ship, total)
    return receipt


# -- 1. registration -----------------------------------------------------------------------
async def test_workflow_decorator_registers_a_code_workflow_started_like_a_pipeline() -> None:
    """@workflow builds a code WorkflowDefinition; TestEngine.start runs it to its output,
    and get_run shows one orchestrating stage and the pinned version."""
    assert isinstance(checkout, CodeWorkflowDefinition)
    assert checkout.kind == "code"
    te = TestEngine([checkout])
    handle = await te.start("checkout", {"n": 4})
    assert await handle.result() == {"total": 40, "note": "shipped"}
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.workflow_version == "2"
    assert [s.stage_id for s in run.stages] == [WORKFLOW_STAGE_ID]
    listed = await te.kernel.reads.list_runs()
    assert [r.id for r in listed] == [handle.run_id]


async def test_invalid_input_is_rejected_before_anything_is_written() -> None:
    """A code workflow validates its input at start, naming the field; no run is stored."""
    from treadle.kernel.errors import InvalidInputError

    te = TestEngine([checkout])
    with pytest.raises(InvalidInputError, match=r"input\.n"):
        await te.start("checkout", {"n": "many"})
    assert te.persistence.runs == {}


def test_workflow_body_must_be_async() -> None:
    """Decorating a sync function is a DefinitionError naming the workflow."""
    from treadle.kernel.errors import DefinitionError

    with pytest.raises(DefinitionError, match="'syncy'"):
        workflow(id="syncy", input=Order)(lambda ctx, order: None)  # type: ignore[arg-type,return-value]


async def test_cancel_a_waiting_code_workflow() -> None:
    """A code workflow is cancelled like any run: it ends CANCELLED and never resumes."""

    @workflow(id="waits", input=Order)
    async def waits(ctx: WorkflowContext, order: Order) -> None:
        await ctx.wait_for_signal("go")
        await ctx.step("after", charge, 1)

    te = TestEngine([waits])
    handle = await te.start("waits", {"n": 1})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    assert await te.cancel(handle.run_id, reason="no longer needed")
    with pytest.raises(InvalidStateError):
        await te.signal(handle.run_id, "go")
    await te.advance_time(timedelta(days=1))
    assert (await te.get_run(handle.run_id)).status is RunStatus.CANCELLED
    assert CALLS == {}


# -- 2. steps and the journal ------------------------------------------------------------------
async def test_steps_are_journaled_and_replay_returns_recorded_results() -> None:
    """Each step runs once; after a sleep the body replays from the top and earlier steps
    return their journaled results (typed by the function's return annotation)."""
    seen: list[Any] = []

    @workflow(id="replay", input=Order, output=Receipt)
    async def replay(ctx: WorkflowContext, order: Order) -> Receipt:
        total = await ctx.step("charge", charge, order.n)
        receipt = await ctx.step("ship", ship, total)
        seen.append(receipt)
        await ctx.sleep(timedelta(minutes=5))
        return Receipt(total=receipt.total + 1, note=receipt.note)

    te = TestEngine([replay], settings=replaying())
    handle = await te.start("replay", {"n": 2})
    await te.run_until_idle()
    await te.advance_time(timedelta(minutes=5))
    assert await handle.result() == {"total": 21, "note": "shipped"}
    assert CALLS == {"charge": 1, "ship": 1}
    assert len(seen) == 2
    assert all(isinstance(r, Receipt) for r in seen)
    journal = await te.journal(handle.run_id)
    assert [(e.kind, e.name, e.occurrence, e.status) for e in journal] == [
        ("step", "charge", 1, JournalStatus.COMPLETED),
        ("step", "ship", 1, JournalStatus.COMPLETED),
        ("sleep", "sleep:sleep", 1, JournalStatus.COMPLETED),
    ]
    types = [e.type for e in te.events]  # type: ignore[attr-defined]
    assert types.count("step:completed") == 2
    assert "timer:fired" in types


async def test_same_step_name_in_a_loop_is_keyed_by_occurrence() -> None:
    """A step name used in a loop is journaled once per occurrence, in order."""

    @workflow(id="loop", input=Order, output=list[int])
    async def loop(ctx: WorkflowContext, order: Order) -> list[int]:
        return [await ctx.step("charge", charge, i) for i in range(order.n)]

    te = TestEngine([loop])
    handle = await te.start("loop", {"n": 3})
    assert await handle.result() == [0, 10, 20]
    journal = await te.journal(handle.run_id)
    assert [(e.name, e.occurrence) for e in journal] == [("charge", i) for i in (1, 2, 3)]


async def test_step_retries_with_durable_backoff_and_suspends_for_long_delays() -> None:
    """A failing step is retried per its RetryPolicy; a backoff longer than the threshold
    suspends the run (no worker held) and the timer resumes it."""
    attempts: list[int] = []

    async def flaky(x: int) -> int:
        info = WorkflowContext.current_step()
        assert info is not None
        attempts.append(info.attempt)
        if info.attempt < 3:
            raise ConnectionError("upstream down")
        return x + 1

    policy = RetryPolicy(
        max_attempts=5, initial_delay=timedelta(minutes=10), max_delay=timedelta(hours=1)
    )

    @workflow(id="retrying", input=Order, output=int)
    async def retrying(ctx: WorkflowContext, order: Order) -> int:
        value: int = await ctx.step("flaky", flaky, order.n, retry=policy)
        return value

    te = TestEngine([retrying])
    handle = await te.start("retrying", {"n": 1})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.SUSPENDED
    assert te.job_transport.has_leased() is False
    (entry,) = await te.journal(handle.run_id)
    assert entry.status is JournalStatus.RETRYING
    assert entry.attempts == 1
    await te.advance_time(timedelta(minutes=10))
    assert attempts == [1, 2]
    await te.advance_time(timedelta(minutes=20))
    assert await handle.result() == 2
    assert attempts == [1, 2, 3]
    failed = [e for e in te.events if e.type == "step:failed"]  # type: ignore[attr-defined]
    assert [e.will_retry for e in failed] == [True, True]  # type: ignore[attr-defined]


async def test_short_backoff_requeues_the_activation_without_suspending() -> None:
    """A backoff under the threshold re-queues the activation after the delay: the run
    stays RUNNING and its next job is due at the retry time."""
    calls: list[datetime] = []

    async def flaky() -> str:
        calls.append(te.clock.now())
        if len(calls) == 1:
            raise ConnectionError("blip")
        return "ok"

    @workflow(id="short", input=Order, output=str)
    async def short(ctx: WorkflowContext, order: Order) -> str:
        value: str = await ctx.step(
            "flaky", flaky, retry=RetryPolicy(initial_delay=timedelta(seconds=5))
        )
        return value

    te = TestEngine([short])
    handle = await te.start("short", {"n": 1})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.RUNNING
    assert await te.job_transport.next_due_at() == calls[0] + timedelta(seconds=5)
    await te.advance_time(timedelta(seconds=5))
    assert await handle.result() == "ok"
    assert calls[1] - calls[0] == timedelta(seconds=5)


async def test_exhausted_retries_raise_a_typed_error_the_workflow_may_catch() -> None:
    """Once retries are exhausted, StepFailedError (naming the step and the cause) is raised
    inside the body, which can compensate; a replay re-raises it without re-running."""

    async def broken() -> None:
        _count("broken")
        raise ValueError("card declined")

    @workflow(id="catches", input=Order, output=str)
    async def catches(ctx: WorkflowContext, order: Order) -> str:
        try:
            await ctx.step("pay", broken, retry=RetryPolicy(max_attempts=2, initial_delay=0))
        except StepFailedError as exc:
            note = f"refused after {exc.attempts} ({exc.step}): {exc.error}"
        await ctx.sleep(timedelta(seconds=60))
        return note

    te = TestEngine([catches])
    handle = await te.start("catches", {"n": 1})
    await te.advance_time(timedelta(seconds=60))
    assert await handle.result() == "refused after 2 (pay): ValueError: card declined"
    assert CALLS == {"broken": 2}


async def test_uncaught_step_failure_fails_the_run_with_the_step_named() -> None:
    """A StepFailedError the body does not catch fails the run; the error names the step."""

    async def broken() -> None:
        raise ValueError("nope")

    @workflow(id="fails", input=Order)
    async def fails(ctx: WorkflowContext, order: Order) -> None:
        await ctx.step("doomed", broken, retry=RetryPolicy(max_attempts=1))

    te = TestEngine([fails])
    handle = await te.start("fails", {"n": 1})
    with pytest.raises(RunFailedError, match="step 'doomed' #1 failed after 1 attempt"):
        await handle.result()
    types = [e.type for e in te.events]  # type: ignore[attr-defined]
    assert types[-1] == "workflow:failed"


async def test_step_timeout_is_a_retryable_failure() -> None:
    """A step attempt running past its timeout fails with StepTimeoutError and is retried."""
    import asyncio

    async def slow() -> str:
        info = WorkflowContext.current_step()
        assert info is not None
        if info.attempt == 1:
            await asyncio.Event().wait()  # hangs until the timeout cancels it
        return "fast enough"

    @workflow(id="timeouts", input=Order, output=str)
    async def timeouts(ctx: WorkflowContext, order: Order) -> str:
        value: str = await ctx.step(
            "slow", slow, timeout=0.01, retry=RetryPolicy(max_attempts=2, initial_delay=0)
        )
        return value

    te = TestEngine([timeouts])
    handle = await te.start("timeouts", {"n": 1})
    assert await handle.result() == "fast enough"
    failed = [e for e in te.events if e.type == "step:failed"]  # type: ignore[attr-defined]
    assert "StepTimeoutError" in failed[0].error  # type: ignore[attr-defined]


async def test_divergent_body_fails_with_non_determinism_naming_both_steps() -> None:
    """If a resumed body reaches another step than the journal recorded, the run fails with
    NonDeterminismError naming both the recorded and the reached step."""
    flip = {"first": True}

    @workflow(id="shifty", input=Order)
    async def shifty(ctx: WorkflowContext, order: Order) -> None:
        if flip["first"]:
            await ctx.step("charge", charge, 1)
        else:
            await ctx.step("refund", charge, 1)
        await ctx.sleep(timedelta(seconds=30))

    te = TestEngine([shifty], settings=replaying())
    handle = await te.start("shifty", {"n": 1})
    await te.run_until_idle()
    flip["first"] = False
    await te.advance_time(timedelta(seconds=30))
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert "NonDeterminismError" in run.error
    assert "step 'refund' #1" in run.error
    assert "step 'charge' #1" in run.error


async def test_non_determinism_cannot_be_swallowed_by_the_body() -> None:
    """A body catching every exception around a divergent call still fails the run."""
    flip = {"first": True}

    @workflow(id="swallows", input=Order)
    async def swallows(ctx: WorkflowContext, order: Order) -> None:
        await ctx.sleep(timedelta(seconds=1), name="first" if flip["first"] else "second")
        with contextlib.suppress(BaseException):  # the point of the test
            await ctx.step("x", charge, 1)

    te = TestEngine([swallows], settings=replaying())
    handle = await te.start("swallows", {"n": 1})
    await te.run_until_idle()
    flip["first"] = False
    await te.advance_time(timedelta(seconds=1))
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "NonDeterminismError" in (run.error or "")
    assert CALLS == {}


# -- 3. time ----------------------------------------------------------------------------------
async def test_sleep_suspends_without_a_job_and_advance_time_fires_the_timer() -> None:
    """A sleeping run is SUSPENDED with no live job; the timer fires exactly when due."""

    @workflow(id="napper", input=Order, output=str)
    async def napper(ctx: WorkflowContext, order: Order) -> str:
        start = ctx.now()
        await ctx.sleep(timedelta(hours=24))
        return (ctx.now() - start).total_seconds().__repr__()

    te = TestEngine([napper])
    handle = await te.start("napper", {"n": 1})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.SUSPENDED
    async with te.persistence.transaction() as tx:
        assert await te.job_transport.live_jobs(tx, handle.run_id) == []
    await te.advance_time(timedelta(hours=23, minutes=59))
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    await te.advance_time(timedelta(minutes=1))
    assert await handle.result() == "86400.0"
    fired = [e for e in te.events if e.type == "timer:fired"]  # type: ignore[attr-defined]
    assert [e.purpose for e in fired] == ["sleep"]  # type: ignore[attr-defined]


async def test_sleep_until_and_journaled_now_and_uuid_are_stable_across_replays() -> None:
    """ctx.now() and ctx.uuid() return the same values on every replay; sleep_until waits
    for an absolute time and returns at once for one that passed."""
    observed: list[tuple[datetime, str]] = []

    @workflow(id="clocky", input=Order)
    async def clocky(ctx: WorkflowContext, order: Order) -> None:
        stamp, ident = ctx.now(), ctx.uuid()
        observed.append((stamp, ident))
        await ctx.sleep_until(stamp - timedelta(days=1))  # in the past: no wait
        await ctx.sleep_until(stamp + timedelta(hours=2))
        await ctx.step("noop", charge, 0)

    te = TestEngine([clocky], settings=replaying())
    handle = await te.start("clocky", {"n": 1})
    await te.run_until_idle()
    await te.advance_time(timedelta(hours=2))
    await handle.result()
    assert len(observed) == 2
    assert observed[0] == observed[1]


# -- 4. signals and queries ------------------------------------------------------------------
@workflow(id="approval", input=Order, output=list[str], signals={"approve": Approval})
async def approval_flow(ctx: WorkflowContext, order: Order) -> list[str]:
    ctx.publish("status", "waiting")
    names = []
    for _ in range(order.n):
        decision: Approval = await ctx.wait_for_signal("approve", Approval)
        names.append(f"{decision.by}:{decision.approved}")
        ctx.publish("status", f"got {len(names)}")
    await ctx.step("done", charge, 1)
    return names


async def test_signal_wakes_a_waiting_run_and_query_reads_published_state() -> None:
    """engine.signal delivers to a waiting body; query returns published state and never
    wakes the run."""
    te = TestEngine([approval_flow])
    handle = await te.start("approval", {"n": 1})
    await te.run_until_idle()
    assert await te.query(handle.run_id, "status") == "waiting"
    assert await te.query(handle.run_id, "never-published") is None
    before = len(await te.kernel.reads.events(handle.run_id))
    await te.run_until_idle()
    assert len(await te.kernel.reads.events(handle.run_id)) == before  # the query changed nothing
    assert await te.signal(handle.run_id, "approve", {"approved": True, "by": "ann"})
    assert await handle.result() == ["ann:True"]
    assert await te.query(handle.run_id, "status") == "got 1"
    received = [e for e in te.events if e.type == "signal:received"]  # type: ignore[attr-defined]
    assert len(received) == 1


async def test_signals_before_the_wait_are_kept_in_order_none_lost_or_doubled() -> None:
    """Signals that arrive before (and while) the body waits are consumed in arrival
    order, each exactly once."""
    te = TestEngine([approval_flow])
    handle = await te.start("approval", {"n": 3})
    for who in ("a", "b"):
        await te.signal(handle.run_id, "approve", {"approved": True, "by": who})
    await te.run_until_idle()
    await te.signal(handle.run_id, "approve", {"approved": False, "by": "c"})
    await te.signal(handle.run_id, "approve", {"approved": False, "by": "extra"})
    assert await handle.result() == ["a:True", "b:True", "c:False"]
    inbox = await te.kernel.reads.inbox(handle.run_id)
    assert [m.payload["by"] for m in inbox] == ["a", "b", "c", "extra"]
    assert [m.consumed_at is not None for m in inbox] == [True, True, True, False]
    assert len({m.consumed_by for m in inbox if m.consumed_by}) == 3


async def test_signal_payload_is_validated_naming_the_field_and_nothing_is_written() -> None:
    """A payload that does not match the declared model raises InvalidPayloadError naming
    the field; an undeclared signal name is refused; the inbox stays empty."""
    te = TestEngine([approval_flow])
    handle = await te.start("approval", {"n": 1})
    with pytest.raises(InvalidPayloadError, match=r"payload\.approved"):
        await te.signal(handle.run_id, "approve", {"approved": "perhaps"})
    with pytest.raises(InvalidPayloadError, match="no signal 'reject'"):
        await te.signal(handle.run_id, "reject", {})
    assert await te.kernel.reads.inbox(handle.run_id) == []


async def test_wait_for_signal_timeout_raises_inside_the_workflow() -> None:
    """Past its timeout, wait_for_signal raises WaitTimeoutError, which the body may catch;
    a signal arriving later stays unconsumed."""

    @workflow(id="impatient", input=Order, output=str)
    async def impatient(ctx: WorkflowContext, order: Order) -> str:
        try:
            await ctx.wait_for_signal("go", timeout=timedelta(hours=1))
        except WaitTimeoutError:
            return "timed out"
        return "signalled"

    te = TestEngine([impatient])
    handle = await te.start("impatient", {"n": 1})
    await te.advance_time(timedelta(hours=1))
    assert await handle.result() == "timed out"
    fired = [e for e in te.events if e.type == "timer:fired"]  # type: ignore[attr-defined]
    assert [e.purpose for e in fired] == ["signal_timeout"]  # type: ignore[attr-defined]


async def test_signal_before_timeout_disarms_the_timer() -> None:
    """A signal that arrives before the timeout resumes the body; the timeout never fires."""

    @workflow(id="patient", input=Order, output=str)
    async def patient(ctx: WorkflowContext, order: Order) -> str:
        payload = await ctx.wait_for_signal("go", timeout=timedelta(hours=1))
        await ctx.sleep(timedelta(hours=2))
        return str(payload)

    te = TestEngine([patient])
    handle = await te.start("patient", {"n": 1})
    await te.run_until_idle()
    await te.signal(handle.run_id, "go", "now")
    await te.advance_time(timedelta(hours=3))
    assert await handle.result() == "now"
    fired = [e for e in te.events if e.type == "timer:fired"]  # type: ignore[attr-defined]
    assert [e.purpose for e in fired] == ["sleep"]  # type: ignore[attr-defined]


async def test_signal_and_query_refuse_stage_pipelines() -> None:
    """Pipelines have no inbox or published state: NotSupportedError."""
    from treadle import WorkflowBuilder, define_stage

    @define_stage(id="s", input=Order, output=Order)
    async def s(ctx: Any) -> Order:
        return Order(n=ctx.input.n)

    pipe = WorkflowBuilder("pipe", input=Order).pipe(s).build()
    te = TestEngine([pipe])
    handle = await te.start("pipe", {"n": 1})
    with pytest.raises(NotSupportedError):
        await te.signal(handle.run_id, "x")
    with pytest.raises(NotSupportedError):
        await te.query(handle.run_id, "x")


# -- 5. harness: mocks, crashes, chaos -----------------------------------------------------------
async def test_mock_step_replaces_the_function_and_records_calls() -> None:
    """te.mock_step swaps a step's function (called with the step's arguments) and records
    each real execution with its attempt; replays do not call it."""
    te = TestEngine([checkout])
    mock = te.mock_step("charge", lambda n: n * 100)
    handle = await te.start("checkout", {"n": 3})
    assert await handle.result() == {"total": 300, "note": "shipped"}
    assert mock.call_count == 1
    assert mock.calls[0].args == (3,)
    assert mock.calls[0].attempt == 1
    assert mock.calls[0].idempotency_key.endswith(":charge:1")
    assert CALLS == {"ship": 1}


async def test_crash_between_two_steps_resumes_exactly() -> None:
    """A worker dying after step 'a' committed and during step 'b': on resume 'a' is not
    run again and 'b' runs exactly once more; the output is as if nothing happened."""

    @workflow(id="crashy", input=Order, output=list[int])
    async def crashy(ctx: WorkflowContext, order: Order) -> list[int]:
        a = await ctx.step("a", charge, order.n)
        b = await ctx.step("b", charge, a)
        c = await ctx.step("c", charge, b)
        return [a, b, c]

    te = TestEngine([crashy])
    b_calls: list[int] = []

    def b_step(x: int) -> int:
        b_calls.append(x)
        if len(b_calls) == 1:
            raise SimulatedCrash
        return x * 10

    te.mock_step("b", b_step)
    handle = await te.start("crashy", {"n": 1})
    with pytest.raises(SimulatedCrash):
        await te.run_until_idle()
    journal = await te.journal(handle.run_id)
    assert [(e.name, e.status) for e in journal] == [("a", JournalStatus.COMPLETED)]
    assert te.job_transport.has_leased()  # the dead worker's lease is still held
    await te.advance_time(timedelta(minutes=1))  # reaped, backed off, re-executed
    assert await handle.result() == [10, 100, 1000]
    assert CALLS == {"charge": 2}  # 'a' once, 'c' once; 'b' is the mock
    assert b_calls == [10, 10]
    assert [e.name for e in await te.journal(handle.run_id)] == ["a", "b", "c"]


async def test_chaos_commit_failures_never_corrupt_the_journal() -> None:
    """Under injected commit failures a code workflow still completes with the right output
    and a journal holding every step exactly once."""

    @workflow(id="chaotic", input=Order, output=int)
    async def chaotic(ctx: WorkflowContext, order: Order) -> int:
        total = 0
        for i in range(order.n):
            total += await ctx.step("add", charge, i)
            if i % 3 == 0:
                await ctx.sleep(timedelta(seconds=10))
        return total

    te = TestEngine([chaotic], chaos=with_chaos(0.15, seed=11))
    handle = await te.start("chaotic", {"n": 9})

    async def read(call: Any) -> Any:
        """The test's own reads go through the chaos too: a failed one is asked again."""
        while True:
            try:
                return await call()
            except TransientStorageError:
                continue

    for _ in range(60):
        await te.advance_time(timedelta(seconds=30))
        if (await read(lambda: te.get_run(handle.run_id))).status.terminal:
            break
    assert await read(handle.result) == sum(i * 10 for i in range(9))
    assert te.chaos is not None
    assert te.chaos.injected > 0
    journal = await read(lambda: te.journal(handle.run_id))
    steps = [(e.name, e.occurrence) for e in journal if e.kind == "step"]
    assert steps == [("add", i + 1) for i in range(9)]
    assert CALLS["charge"] >= 9


# -- signal-with-start and the commands that do not apply ---------------------------------------
async def test_start_or_signal_starts_once_then_signals_the_live_run() -> None:
    """Signal-with-start creates the run with the signal in its inbox; the same key again
    signals that run instead of starting another; every signal is delivered in order."""
    from treadle.engine import Engine

    te = TestEngine([approval_flow])
    engine = Engine(te.kernel)
    first = await engine.start_or_signal(
        "approval", {"n": 2}, "approve", {"approved": True, "by": "a"}, idempotency_key="k1"
    )
    await te.run_until_idle()
    second = await engine.start_or_signal(
        "approval", {"n": 2}, "approve", {"approved": True, "by": "b"}, idempotency_key="k1"
    )
    assert second.run_id == first.run_id
    assert len(te.persistence.runs) == 1
    assert await te.start("approval", {"n": 2}, idempotency_key="k1") is not None
    assert len(te.persistence.runs) == 1
    await te.run_until_idle()
    run = await te.get_run(first.run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == ["a:True", "b:True"]


async def test_start_or_signal_with_a_bad_payload_writes_nothing() -> None:
    """Signal-with-start validates the signal payload before creating the run."""
    from treadle.kernel import commands as c

    te = TestEngine([approval_flow])
    with pytest.raises(InvalidPayloadError, match=r"payload\.approved"):
        await te.dispatch(
            c.RunCreate(
                workflow_id="approval",
                input={"n": 1},
                idempotency_key="k",
                signal=c.SignalSpec(name="approve", payload={"approved": []}),
            )
        )
    assert te.persistence.runs == {}


async def test_rerun_from_is_refused_for_code_workflows() -> None:
    """rerun_from resets pipeline stages; a code workflow replays its journal, so the
    command is refused with NotSupportedError rather than silently doing nothing."""
    from treadle.kernel import commands as c

    te = TestEngine([checkout])
    handle = await te.start("checkout", {"n": 1})
    await handle.result()
    with pytest.raises(NotSupportedError, match="code workflow"):
        await te.dispatch(
            c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id=WORKFLOW_STAGE_ID)
        )


# -- 6. updates ---------------------------------------------------------------------------------
class Bump(BaseModel):
    by: int


@workflow(id="counter", input=Order, output=int, updates={"bump": Bump})
async def counter(ctx: WorkflowContext, order: Order) -> int:
    total = order.n
    while total < 10:
        request = await ctx.wait_for_update("bump", Bump, timeout=timedelta(days=1))
        total += request.payload.by
        ctx.publish("total", total)
        await request.reply({"total": total})
    return total


async def test_update_returns_the_reply_of_the_waiting_body() -> None:
    """engine.update delivers to a body waiting in wait_for_update and returns the value
    it replies with; replies are journaled, so replays never answer twice."""
    te = TestEngine([counter])
    handle = await te.start("counter", {"n": 1})
    await te.run_until_idle()
    assert await te.update(handle.run_id, "bump", {"by": 4}) == {"total": 5}
    assert await te.update(handle.run_id, "bump", {"by": 5}) == {"total": 10}
    assert await handle.result() == 10
    replies = [e for e in await te.journal(handle.run_id) if e.kind == "reply"]
    assert [e.result["value"] for e in replies] == [{"total": 5}, {"total": 10}]


async def test_update_through_the_engine_facade_waits_for_the_reply() -> None:
    """Engine.update dispatches run.update, then waits (a worker runs the body) for the
    reply; a retried call with the same idempotency key is not delivered twice."""
    from treadle.engine import Engine

    te = TestEngine([counter])
    engine = Engine(te.kernel)
    handle = await te.start("counter", {"n": 0})
    await te.run_until_idle()

    import asyncio

    async def drive() -> None:
        for _ in range(100):
            await te.run_until_idle()
            await asyncio.sleep(0)

    reply, _ = await asyncio.gather(
        engine.update(handle.run_id, "bump", {"by": 3}, timeout=5, idempotency_key="u1"), drive()
    )
    assert reply == {"total": 3}
    again = await engine.update(handle.run_id, "bump", {"by": 3}, idempotency_key="u1")
    assert again == {"total": 3}
    inbox = await te.kernel.reads.inbox(handle.run_id)
    assert [m.kind for m in inbox] == ["update"]


async def test_update_payload_is_validated_and_pipelines_refuse_updates() -> None:
    """A bad update payload names the field and writes nothing; an unanswered update
    times out in Engine.update."""
    from treadle.engine import Engine

    te = TestEngine([counter])
    handle = await te.start("counter", {"n": 0})
    with pytest.raises(InvalidPayloadError, match=r"payload\.by"):
        await te.update(handle.run_id, "bump", {"by": "lots"})
    assert await te.kernel.reads.inbox(handle.run_id) == []
    with pytest.raises(TimeoutError):
        await Engine(te.kernel).update(handle.run_id, "bump", {"by": 1}, timeout=0.01)


# -- 6. human review --------------------------------------------------------------------------
@workflow(id="publishing", input=Order, output=str)
async def publishing(ctx: WorkflowContext, order: Order) -> str:
    draft = await ctx.step("draft", charge, order.n)
    decision = await ctx.review(
        {"draft": draft}, review_type="editorial", reviewers=["ed"], timeout=timedelta(days=2)
    )
    if not decision.approved:
        return f"{decision.decision} by {decision.reviewer}"
    await ctx.step("publish", charge, draft)
    return f"published ({decision.comment})"


def _review_id(te: TestEngine) -> str:
    requested = [e for e in te.events if e.type == "review:requested"]  # type: ignore[attr-defined]
    assert len(requested) == 1
    return str(requested[0].review_id)  # type: ignore[attr-defined]


async def test_review_requests_suspends_and_resumes_with_the_decision() -> None:
    """ctx.review records review:requested and suspends; decide_review records
    review:decided and the body resumes with the decision; a second decision is refused."""
    from treadle.engine import Engine

    te = TestEngine([publishing])
    engine = Engine(te.kernel)
    handle = await te.start("publishing", {"n": 2})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    review_id = _review_id(te)
    (entry,) = [e for e in await te.journal(handle.run_id) if e.kind == "review"]
    assert entry.input is not None
    assert entry.input["artifact"] == {"draft": 20}
    assert entry.input["reviewers"] == ["ed"]
    assert await engine.decide_review(
        handle.run_id, review_id, "approved", reviewer="ed", comment="lovely"
    )
    assert await handle.result() == "published (lovely)"
    with pytest.raises(InvalidStateError):
        await engine.decide_review(handle.run_id, review_id, "rejected")
    types = [e.type for e in te.events]  # type: ignore[attr-defined]
    assert types.count("review:decided") == 1


async def test_review_decisions_are_validated() -> None:
    """An unknown review id is NotFoundError, a bad decision an InvalidCommandError naming
    the field, a second decision InvalidStateError; a rejection resumes the body."""
    from treadle.kernel import commands as c
    from treadle.kernel.errors import InvalidCommandError, NotFoundError

    te = TestEngine([publishing])
    handle = await te.start("publishing", {"n": 1})
    await te.run_until_idle()
    review_id = _review_id(te)
    with pytest.raises(NotFoundError, match="no review 'nope'"):
        await te.dispatch(
            c.ReviewDecide(workflow_run_id=handle.run_id, review_id="nope", decision="approved")
        )
    with pytest.raises(InvalidCommandError, match="decision"):
        await te.dispatch(
            {
                "type": "review.decide",
                "workflow_run_id": handle.run_id,
                "review_id": review_id,
                "decision": "maybe",
            }
        )
    decide = c.ReviewDecide(
        workflow_run_id=handle.run_id, review_id=review_id, decision="rejected", reviewer="ed"
    )
    await te.dispatch(decide)
    with pytest.raises(InvalidStateError, match="already decided"):
        await te.dispatch(decide)
    assert await handle.result() == "rejected by ed"


async def test_review_timeout_resumes_with_a_timed_out_decision() -> None:
    """A review nobody decides resumes the body with decision 'timed_out' at its timeout."""
    te = TestEngine([publishing])
    handle = await te.start("publishing", {"n": 1})
    await te.advance_time(timedelta(days=2))
    assert await handle.result() == "timed_out by None"
    fired = [e for e in te.events if e.type == "timer:fired"]  # type: ignore[attr-defined]
    assert [e.purpose for e in fired] == ["review_timeout"]  # type: ignore[attr-defined]
