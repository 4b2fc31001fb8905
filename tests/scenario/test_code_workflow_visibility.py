"""Visibility of code workflows (issue 5, requirement 8): ``ctx.set_attribute`` writes
search attributes with the journal checkpoint and ``engine.list(attributes=...)`` finds
the run on every backend; every code-workflow event goes through the outbox and reads
back as its typed model."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, RetryPolicy, RunStatus, WorkflowContext, workflow
from treadle.kernel import events as ev
from treadle.kernel.errors import TreadleValidationError
from treadle.kernel.model import RunFilter
from treadle.testing import FakeClock, SimulatedCrash, TestEngine
from treadle.tests.scenario.helpers import WAIT, run_events, until_event, until_status, worker


class Order(BaseModel):
    customer: str


class Approval(BaseModel):
    approved: bool


FLAKY: dict[str, int] = {}


async def charge(customer: str) -> str:
    return f"ch-{customer}"


async def flaky(customer: str) -> str:
    FLAKY["attempts"] = FLAKY.get("attempts", 0) + 1
    if FLAKY["attempts"] == 1:
        raise ConnectionError("gateway timeout")
    return "reserved"


@workflow(id="tracked", input=Order, output=str)
async def tracked(ctx: WorkflowContext, order: Order) -> str:
    ctx.set_attribute("customer", order.customer)
    ctx.set_attribute("stage", "charging")
    await ctx.step("charge", charge, order.customer)
    ctx.set_attribute("stage", "sleeping")
    await ctx.sleep(timedelta(hours=1))
    ctx.set_attribute("stage", "done")
    ctx.set_attribute("amount", 42)
    return "ok"


@workflow(id="eventful", input=Order, output=str, signals={"approve": Approval})
async def eventful(ctx: WorkflowContext, order: Order) -> str:
    """A step that fails once, a sleep, a signal, an attribute, a review and an update."""
    await ctx.step("reserve", flaky, order.customer, retry=RetryPolicy(initial_delay=1.0))
    await ctx.sleep(timedelta(minutes=5), name="cool-off")
    approval: Approval = await ctx.wait_for_signal("approve", Approval)
    ctx.set_attribute("approved", approval.approved)
    decision = await ctx.review({"c": order.customer}, review_type="qa")
    request = await ctx.wait_for_update("confirm")
    await request.reply({"decision": decision.decision})
    return decision.decision


WORKFLOWS = [tracked, eventful]


@pytest.fixture(autouse=True)
def _reset() -> None:
    FLAKY.clear()


async def _ids(engine: Engine, **attributes: Any) -> list[str]:
    return sorted(r.id for r in await engine.list(attributes=attributes))


# -- set_attribute -----------------------------------------------------------------------------
async def test_set_attribute_is_listable_on_every_backend_and_never_rewritten_on_replay(
    engine: Engine, clock: FakeClock
) -> None:
    """Attributes set by the body are visible to ``engine.list`` once the body reaches its
    next durable boundary, merged with the start-time ones; the replay after the sleep
    re-reads them from the journal without writing or announcing them again."""
    async with worker(engine):
        acme = await engine.start("tracked", {"customer": "acme"}, search_attributes={"env": "t"})
        zeta = await engine.start("tracked", {"customer": "zeta"})
        await until_status(engine, acme.run_id, RunStatus.SUSPENDED)
        await until_status(engine, zeta.run_id, RunStatus.SUSPENDED)
        assert await _ids(engine, stage="sleeping") == sorted([acme.run_id, zeta.run_id])
        assert await _ids(engine, customer="acme", stage="sleeping") == [acme.run_id]
        assert await _ids(engine, customer="acme", env="t") == [acme.run_id]
        assert await _ids(engine, stage="charging") == []
        clock.advance(timedelta(hours=1))
        assert await acme.result(timeout=WAIT) == "ok"
        assert await zeta.result(timeout=WAIT) == "ok"
    run = await engine.get_run(acme.run_id)
    assert run.search_attributes == {"env": "t", "customer": "acme", "stage": "done", "amount": 42}
    assert await _ids(engine, stage="done", amount=42) == sorted([acme.run_id, zeta.run_id])
    assert await _ids(engine, customer="zeta", amount=42.0) == [zeta.run_id]
    assert await _ids(engine, amount="42") == []
    events = await run_events(engine, acme.run_id)
    sets = [(e.key, e.value) for e in events if isinstance(e, ev.AttributeSet)]
    assert sets == [
        ("customer", "acme"),
        ("stage", "charging"),
        ("stage", "sleeping"),
        ("stage", "done"),
        ("amount", 42),
    ]
    journal = await engine.journal(acme.run_id)
    attrs = [(e.name, e.occurrence, e.result) for e in journal if e.kind == "attribute"]
    assert attrs == [
        ("attribute:customer", 1, "acme"),
        ("attribute:stage", 1, "charging"),
        ("attribute:stage", 2, "sleeping"),
        ("attribute:stage", 3, "done"),
        ("attribute:amount", 1, 42),
    ]


async def test_set_attribute_and_annotations_share_the_search_attributes(
    engine: Engine, clock: FakeClock
) -> None:
    """An annotation attached while the run sleeps and the body's attributes merge into
    the same search attributes; later writes of one key win, other keys are kept."""
    async with worker(engine):
        handle = await engine.start("tracked", {"customer": "acme"})
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        await engine.annotate(handle.run_id, {"reviewed_by": "ann", "stage": "annotated"})
        assert await _ids(engine, reviewed_by="ann", customer="acme") == [handle.run_id]
        assert await _ids(engine, stage="annotated") == [handle.run_id]
        clock.advance(timedelta(hours=1))
        assert await handle.result(timeout=WAIT) == "ok"
    run = await engine.get_run(handle.run_id)
    assert run.search_attributes == {
        "customer": "acme",
        "stage": "done",
        "reviewed_by": "ann",
        "amount": 42,
    }


async def test_set_attribute_commits_with_the_checkpoint_not_before() -> None:
    """An attribute set before an execution dies is not visible (nothing was committed);
    the replay sets it again and it is then written and announced exactly once."""

    crashes: list[int] = []

    def crash_once(customer: str) -> str:
        crashes.append(1)
        if len(crashes) == 1:
            raise SimulatedCrash
        return "ok"

    @workflow(id="crashy-attrs", input=Order, output=str)
    async def crashy(ctx: WorkflowContext, order: Order) -> str:
        await ctx.step("a", charge, order.customer)
        ctx.set_attribute("phase", "b")
        await ctx.sleep(timedelta(seconds=1))
        ctx.set_attribute("phase", "c")
        return str(await ctx.step("c", crash_once, order.customer))

    te = TestEngine([crashy])
    handle = await te.start("crashy-attrs", {"customer": "x"})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).search_attributes == {"phase": "b"}
    with pytest.raises(SimulatedCrash):
        await te.advance_time(timedelta(seconds=1))
    # The step commits the pending attribute before it runs: "c" is recorded with it.
    assert (await te.get_run(handle.run_id)).search_attributes == {"phase": "c"}
    await te.advance_time(timedelta(minutes=1))  # lease reaped, activation replays
    assert await handle.result() == "ok"
    sets = [e for e in te.events if isinstance(e, ev.AttributeSet)]
    assert [(e.key, e.value) for e in sets] == [("phase", "b"), ("phase", "c")]


async def test_set_attribute_before_a_crash_with_no_boundary_is_not_written() -> None:
    """A body that sets an attribute and dies before its next durable boundary leaves no
    attribute and no journal entry behind; the replay writes it once."""

    lives: list[int] = []

    @workflow(id="dies", input=Order, output=str)
    async def dies(ctx: WorkflowContext, order: Order) -> str:
        ctx.set_attribute("seen", True)
        lives.append(1)
        if len(lives) == 1:
            raise SimulatedCrash
        await ctx.sleep(timedelta(hours=1))
        return "ok"

    te = TestEngine([dies])
    handle = await te.start("dies", {"customer": "x"})
    with pytest.raises(SimulatedCrash):
        await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).search_attributes == {}
    assert await te.journal(handle.run_id) == []
    await te.advance_time(timedelta(minutes=1))
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.SUSPENDED
    assert run.search_attributes == {"seen": True}
    assert [e.kind for e in await te.journal(handle.run_id)] == ["attribute", "sleep"]
    assert sum(isinstance(e, ev.AttributeSet) for e in te.events) == 1


@pytest.mark.parametrize(
    ("key", "value", "field", "fragment"),
    [
        ("", "x", "key", "key must be a non-empty string"),
        (7, "x", "key", "key must be a non-empty string"),
        ('say "hi"', "x", "key", "without"),
        ("tags", ["a"], "value", "value must be a string, a finite number"),
        ("nested", {"a": 1}, "value", "value must be a string, a finite number"),
        ("ratio", float("nan"), "value", "value must be a string, a finite number"),
    ],
)
async def test_set_attribute_rejects_bad_keys_and_values(
    key: Any, value: Any, field: str, fragment: str
) -> None:
    """A bad key or value raises a validation error naming it inside the body, before
    anything is journaled; a body that catches it carries on deterministically."""
    caught: list[TreadleValidationError] = []

    @workflow(id="bad-attrs", input=Order, output=str)
    async def bad(ctx: WorkflowContext, order: Order) -> str:
        try:
            ctx.set_attribute(key, value)
        except TreadleValidationError as exc:
            caught.append(exc)
        ctx.set_attribute("fine", None)
        return "ok"

    te = TestEngine([bad])
    handle = await te.start("bad-attrs", {"customer": "x"})
    assert await handle.result() == "ok"
    assert caught
    assert fragment in str(caught[0])
    assert caught[0].errors[0][0] == field
    run = await te.get_run(handle.run_id)
    assert run.search_attributes == {"fine": None}
    found = await te.kernel.reads.list_runs(RunFilter(attributes={"fine": None}))
    assert [r.id for r in found] == [handle.run_id]
    assert [e.kind for e in await te.journal(handle.run_id)] == ["attribute"]


# -- events --------------------------------------------------------------------------------------
async def test_code_workflow_events_go_through_the_outbox_as_typed_models(
    engine: Engine, clock: FakeClock
) -> None:
    """A representative run (a step retried once, a sleep, a signal, an attribute, a
    review) records every event in the outbox, in order, and every backend reads them
    back as the same typed models."""
    async with worker(engine):
        handle = await engine.start("eventful", {"customer": "acme"})
        await until_event(engine, handle.run_id, "step:failed")
        clock.advance(timedelta(seconds=2))  # past the 1 s retry backoff
        await until_event(engine, handle.run_id, "workflow:suspended")  # the cool-off sleep
        clock.advance(timedelta(minutes=5))
        await until_event(engine, handle.run_id, "workflow:suspended", count=2)  # the signal
        await engine.signal(handle.run_id, "approve", {"approved": True})
        requested = await until_event(engine, handle.run_id, "review:requested")
        await until_event(engine, handle.run_id, "workflow:suspended", count=3)
        assert isinstance(requested, ev.ReviewRequested)
        await engine.decide_review(handle.run_id, requested.review_id, "approved", reviewer="qa")
        await until_event(engine, handle.run_id, "workflow:suspended", count=4)
        reply = await engine.update(handle.run_id, "confirm", {"ok": 1}, timeout=WAIT)
        assert reply == {"decision": "approved"}
        assert await handle.result(timeout=WAIT) == "approved"
    events = await run_events(engine, handle.run_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    for event in events:
        assert type(event) is type(ev.parse_event(ev.dump_event(event)))
    assert [type(e) for e in events] == [
        ev.WorkflowCreated,
        ev.WorkflowStarted,
        ev.StageStarted,
        ev.StepFailed,  # attempt 1 of "reserve", will_retry
        ev.StageStarted,  # the activation queued after the 1 s backoff
        ev.StepCompleted,
        ev.WorkflowSuspended,  # sleeping
        ev.TimerFired,
        ev.StageStarted,
        ev.WorkflowSuspended,  # waiting for the signal
        ev.SignalReceived,
        ev.StageStarted,
        ev.AttributeSet,
        ev.ReviewRequested,
        ev.WorkflowSuspended,
        ev.ReviewDecided,
        ev.StageStarted,
        ev.WorkflowSuspended,  # waiting for the update
        ev.UpdateReceived,
        ev.StageStarted,
        ev.UpdateReplied,
        ev.StageCompleted,
        ev.WorkflowCompleted,
    ]
    failed = next(e for e in events if isinstance(e, ev.StepFailed))
    assert (failed.step, failed.attempt, failed.will_retry) == ("reserve", 1, True)
    assert "gateway timeout" in failed.error
    fired = next(e for e in events if isinstance(e, ev.TimerFired))
    assert (fired.step, fired.purpose) == ("sleep:cool-off", "sleep")
    setting = next(e for e in events if isinstance(e, ev.AttributeSet))
    assert (setting.key, setting.value) == ("approved", True)
    received = next(e for e in events if isinstance(e, ev.UpdateReceived))
    replied = next(e for e in events if isinstance(e, ev.UpdateReplied))
    assert (received.name, received.payload) == ("confirm", {"ok": 1})
    assert (replied.update_id, replied.reply) == (received.update_id, {"decision": "approved"})
