"""``workflow:suspended`` says what the run waits for (``waiting_for``), for every kind of
wait of a code workflow and for a pipeline's batch stage (issue 13, item 11)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    NotReady,
    RetryPolicy,
    Suspend,
    WorkflowBuilder,
    WorkflowContext,
    define_batch_stage,
    workflow,
)
from treadle.kernel.events import WorkflowSuspended, parse_event
from treadle.kernel.model import RunStatus
from treadle.kernel.workflows.definition import WORKFLOW_STAGE_ID
from treadle.testing import TestEngine


class Empty(BaseModel):
    pass


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


def _code(body: Callable[[WorkflowContext], Awaitable[Any]], wf_id: str = "waiter") -> Any:
    @workflow(id=wf_id, input=Empty)
    async def waiter(ctx: WorkflowContext, _: Empty) -> None:
        await body(ctx)

    return waiter


def _failing(_: None = None) -> None:
    raise ConnectionError("upstream down")


async def _sleep(ctx: WorkflowContext) -> None:
    await ctx.sleep(timedelta(hours=2))


async def _signal(ctx: WorkflowContext) -> None:
    await ctx.wait_for_signal("approval", timeout=timedelta(days=1))


async def _signal_forever(ctx: WorkflowContext) -> None:
    await ctx.wait_for_signal("approval")


async def _update(ctx: WorkflowContext) -> None:
    await ctx.wait_for_update("set-address")


async def _review(ctx: WorkflowContext) -> None:
    await ctx.review({"draft": 1}, reviewers=["ana"])


async def _retry(ctx: WorkflowContext) -> None:
    await ctx.step("flaky", _failing, retry=RetryPolicy(max_attempts=3, initial_delay=120))


async def _both(ctx: WorkflowContext) -> None:
    await ctx.all(ctx.sleep(timedelta(hours=2)), ctx.wait_for_signal("approval"))


WAITS: list[tuple[str, Callable[[WorkflowContext], Awaitable[Any]], Callable[[datetime], str]]] = [
    ("sleep", _sleep, lambda t0: f"sleep until {_iso(t0 + timedelta(hours=2))}"),
    ("signal", _signal, lambda t0: f"signal approval (timeout at {_iso(t0 + timedelta(days=1))})"),
    ("signal-no-timeout", _signal_forever, lambda _: "signal approval"),
    ("update", _update, lambda _: "update set-address"),
    ("review", _review, lambda _: "review"),
    ("retry", _retry, lambda t0: f"retry of step flaky at {_iso(t0 + timedelta(seconds=120))}"),
    (
        "all",
        _both,
        lambda t0: f"sleep until {_iso(t0 + timedelta(hours=2))}; signal approval",
    ),
]


async def _suspensions(te: TestEngine, run_id: str) -> list[WorkflowSuspended]:
    return [
        e for e in te.events if isinstance(e, WorkflowSuspended) and e.workflow_run_id == run_id
    ]


@pytest.mark.parametrize(("kind", "body", "expected"), WAITS, ids=[w[0] for w in WAITS])
async def test_code_workflow_suspension_says_what_it_waits_for(
    kind: str,
    body: Callable[[WorkflowContext], Awaitable[Any]],
    expected: Callable[[datetime], str],
) -> None:
    """Each kind of wait puts its reason on ``workflow:suspended``: the sleep's end, the
    signal or update name (with its timeout), a review, a step's retry time."""
    te = TestEngine([_code(body)])
    start = te.clock.now()
    handle = await te.start("waiter", {})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    [event] = await _suspensions(te, handle.run_id)
    assert event.waiting_for == expected(start)


async def test_child_wait_names_the_child_run() -> None:
    """A parent awaiting ``ctx.child`` suspends ``waiting_for`` ``child <child run id>``."""

    @workflow(id="kid", input=Empty)
    async def kid(ctx: WorkflowContext, _: Empty) -> None:
        await ctx.wait_for_signal("go")

    @workflow(id="parent", input=Empty)
    async def parent(ctx: WorkflowContext, _: Empty) -> None:
        await ctx.child("kid", {})

    te = TestEngine([kid, parent])
    handle = await te.start("parent", {})
    await te.run_until_idle()
    children = [r for r in te.persistence.runs.values() if r.parent_run_id == handle.run_id]
    [child] = children
    [event] = await _suspensions(te, handle.run_id)
    assert event.waiting_for == f"child {child.id}"


async def test_each_new_wait_suspends_with_its_own_reason() -> None:
    """A run that sleeps, then waits for a signal, records one suspension per wait, each
    with its reason, in order."""

    async def body(ctx: WorkflowContext) -> None:
        await ctx.sleep(timedelta(minutes=5))
        await ctx.wait_for_signal("approval")

    te = TestEngine([_code(body)])
    start = te.clock.now()
    handle = await te.start("waiter", {})
    await te.run_until_idle()
    await te.advance_time(timedelta(minutes=5))
    reasons = [e.waiting_for for e in await _suspensions(te, handle.run_id)]
    assert reasons == [f"sleep until {_iso(start + timedelta(minutes=5))}", "signal approval"]


POLL = timedelta(minutes=5)


@define_batch_stage(id="batch", input=Empty, output=Empty)
async def batch(ctx):  # type: ignore[no-untyped-def]
    return Suspend(state={}, poll_interval=POLL, max_wait=timedelta(hours=1))


@batch.check_completion
async def batch_check(state: Any, ctx: Any) -> Any:
    return NotReady()


async def test_batch_stage_suspension_says_when_it_polls() -> None:
    """A pipeline suspended on its batch stage says ``batch poll at T``, T the stage's
    next poll."""
    te = TestEngine([WorkflowBuilder("batch-wf", input=Empty).pipe(batch).build()])
    start = te.clock.now()
    handle = await te.start("batch-wf", {})
    await te.run_until_idle()
    [event] = await _suspensions(te, handle.run_id)
    assert event.waiting_for == f"batch poll at {_iso(start + POLL)}"


def test_old_stored_events_without_a_reason_still_parse() -> None:
    """A ``workflow:suspended`` stored before ``waiting_for`` existed reads back with
    ``waiting_for=None``."""
    event = parse_event(
        '{"type": "workflow:suspended", "workflow_run_id": "r1", "sequence": 3, '
        '"causation_id": null, "timestamp": "2026-01-01T00:00:00Z"}'
    )
    assert isinstance(event, WorkflowSuspended)
    assert event.waiting_for is None


def test_progress_line_says_what_the_run_waits_for() -> None:
    """``treadle start --wait``'s activity text shows a code workflow's reason, not
    "waiting on batch job", and a batch stage's next poll."""
    from treadle.hosts.cli.progress import activity
    from treadle.kernel.model import Run, StageRun, StageStatus

    now = datetime.fromisoformat("2026-01-01T12:00:00+00:00")
    code_run = Run(
        id="r1",
        workflow_id="waiter",
        status=RunStatus.SUSPENDED,
        created_at=now,
        updated_at=now,
        stages=[
            StageRun(
                workflow_run_id="r1",
                stage_id=WORKFLOW_STAGE_ID,
                execution_group=0,
                status=StageStatus.SUSPENDED,
                next_poll_at=now,
            )
        ],
    )
    assert activity(code_run, {}, {}, "signal approval") == "waiting for signal approval"
    assert "batch" not in activity(code_run, {}, {}, None)
    batch_run = code_run.model_copy(
        update={
            "stages": [
                StageRun(
                    workflow_run_id="r1",
                    stage_id="translate",
                    execution_group=0,
                    status=StageStatus.SUSPENDED,
                    next_poll_at=now + POLL,
                    poll_interval=POLL,
                )
            ]
        }
    )
    assert activity(batch_run, {}, {}, "batch poll at ...") == "translate batch poll at 12:05:00"
