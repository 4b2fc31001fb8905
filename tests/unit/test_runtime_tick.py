"""The shared maintenance tick: its fixed step order, step isolation, and what each
step does, on the in-memory adapters under a FakeClock (no real waiting)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Ready, Suspend, WorkflowBuilder, define_batch_stage, define_stage
from treadle.adapters.memory import (
    CollectingEventSink,
    InMemoryBlobStore,
    InMemoryJobTransport,
    InMemoryPersistence,
    InMemoryScheduler,
)
from treadle.kernel import commands as c
from treadle.kernel.errors import TransientStorageError
from treadle.kernel.kernel import Kernel, create_kernel
from treadle.kernel.model import JobStatus, RunStatus
from treadle.runtime import STEP_ORDER, TickReport, maintenance_tick
from treadle.testing import FakeClock


class In(BaseModel):
    n: int


@define_stage(id="double", input=In, output=In)
async def double(ctx):  # type: ignore[no-untyped-def]
    return In(n=ctx.input.n * 2)


@define_batch_stage(id="batch", input=In, output=In)
async def batch(ctx):  # type: ignore[no-untyped-def]
    return Suspend(state={"n": ctx.input.n}, poll_interval=timedelta(minutes=5))


@batch.check_completion
async def _batch_ready(state, ctx):  # type: ignore[no-untyped-def]
    return Ready(output={"n": state["n"] + 1})


WF = WorkflowBuilder("wf", input=In).pipe(double).build()
BATCH_WF = WorkflowBuilder("batch-wf", input=In).pipe(batch).pipe(double).build()

COMMAND_OF_STEP = {
    "schedules": "schedule.fireDue",
    "claim": "run.claimPending",
    "poll_suspended": "stage.pollSuspended",
    "reap_stale": "lease.reapStale",
    "flush_outbox": "outbox.flush",
    "reap_stuck": "run.reapStuck",
}


class Harness:
    """A kernel on in-memory ports whose dispatches are recorded and can be made to fail."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.persistence = InMemoryPersistence()
        self.transport = InMemoryJobTransport(self.persistence)
        self.sink = CollectingEventSink()
        self.scheduler = InMemoryScheduler()
        self.kernel: Kernel = create_kernel(
            persistence=self.persistence,
            job_transport=self.transport,
            blob_store=InMemoryBlobStore(),
            event_sink=self.sink,
            scheduler=self.scheduler,
            clock=self.clock,
            registry=[WF, BATCH_WF],
        )
        self.dispatched: list[str] = []
        self.fail: Callable[[str], bool] = lambda kind: False
        real = self.kernel.dispatch

        async def dispatch(command: c.CommandBase | Mapping[str, Any]) -> Any:
            kind = str(Kernel.parse(command).type)  # type: ignore[attr-defined]
            self.dispatched.append(kind)
            if self.fail(kind):
                raise TransientStorageError(f"injected failure in {kind}")
            return await real(command)

        self.kernel.dispatch = dispatch  # type: ignore[method-assign]

    async def start(self, workflow_id: str = "wf", n: int = 1) -> str:
        result = await self.kernel.dispatch(c.RunCreate(workflow_id=workflow_id, input={"n": n}))
        self.dispatched.clear()
        return str(result.workflow_run_id)

    async def tick(self, **options: Any) -> TickReport:
        return await maintenance_tick(self.kernel, worker_id="w1", **options)

    async def execute_all(self) -> None:
        for job in await self.transport.dequeue("w1", self.clock.now(), limit=100):
            await self.kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))


async def test_steps_run_in_fixed_order() -> None:
    """A tick dispatches schedule fires, claim, poll, stale-lease release, outbox flush,
    stuck reaping, in that order, and the report lists the steps in the same order."""
    h = Harness()
    await h.start()
    report = await h.tick()
    assert report.ok
    assert list(report.steps) == list(STEP_ORDER)
    assert h.dispatched == [COMMAND_OF_STEP[s] for s in STEP_ORDER if s in COMMAND_OF_STEP]


async def test_claim_precedes_flush_so_one_tick_publishes_the_start() -> None:
    """Claiming before flushing means the same tick publishes workflow:started."""
    h = Harness()
    run_id = await h.start()
    report = await h.tick()
    assert report.claimed_runs == 1
    assert report.new_work
    assert report.result("flush_outbox")["published"] == 2
    assert h.sink.types(run_id) == ["workflow:created", "workflow:started"]
    assert [j.status for j in h.transport.jobs.values()] == [JobStatus.QUEUED]


async def test_the_flush_step_flushes_again_while_batches_come_back_full() -> None:
    """With more events waiting than ``max_events``, one tick's flush step sends
    ``outbox.flush`` again while a batch comes back full, so the outbox keeps up with a
    busy worker (here 25 runs' 2 events each in batches of 10: all 50 in one tick)."""
    h = Harness()
    for _ in range(25):
        await h.start()
    report = await h.tick(max_events=10, max_claims=100)
    assert report.result("flush_outbox") == {"published": 50, "failed": 0, "dead_lettered": 0}
    assert h.dispatched.count("outbox.flush") == 6  # five full batches, then an empty one
    assert len(h.sink.events) == 50


@pytest.mark.parametrize("failing", sorted(COMMAND_OF_STEP))
async def test_a_failing_step_does_not_stop_the_others(failing: str) -> None:
    """Whichever step raises, it is reported with its error and every other step still runs."""
    h = Harness()
    await h.start()
    command = COMMAND_OF_STEP[failing]
    h.fail = lambda kind: kind == command
    report = await h.tick()
    assert not report.ok
    assert not report.all_failed
    assert list(report.errors) == [failing]
    assert "injected failure" in report.errors[failing]
    assert report.steps[failing].result is None
    assert h.dispatched == [COMMAND_OF_STEP[s] for s in STEP_ORDER if s in COMMAND_OF_STEP]
    for name in set(COMMAND_OF_STEP) - {failing}:
        assert report.steps[name].ok, name


async def test_all_steps_failing_is_reported_not_raised() -> None:
    """An unreachable backend fails every step: the tick still returns, flagged all_failed."""
    h = Harness()
    h.fail = lambda kind: True
    report = await h.tick()
    assert report.all_failed
    assert set(report.errors) == set(COMMAND_OF_STEP)
    assert report.steps["scheduled"].ok  # nothing was due, so nothing was dispatched


async def test_poll_resumes_suspended_stage_and_transitions_its_run() -> None:
    """A due suspended stage is checked, completed, and its run advanced to the next group
    in the same tick; before it is due, the poll checks nothing."""
    h = Harness()
    run_id = await h.start("batch-wf", n=3)
    await h.tick()
    await h.execute_all()
    async with h.persistence.transaction() as tx:
        assert (await tx.runs.get(run_id)).status is RunStatus.SUSPENDED  # type: ignore[union-attr]
    early = await h.tick()
    assert early.result("poll_suspended")["checked"] == 0
    h.clock.advance(timedelta(minutes=5))
    h.dispatched.clear()
    report = await h.tick()
    poll = report.result("poll_suspended")
    assert poll["resumed_workflow_run_ids"] == [run_id]
    assert report.new_work
    assert h.dispatched.index("stage.pollSuspended") < h.dispatched.index("lease.reapStale")
    await h.execute_all()
    async with h.persistence.transaction() as tx:
        run = await tx.runs.get(run_id)
    assert run is not None
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"n": 8}


async def test_stale_lease_is_released_after_threshold() -> None:
    """A job leased by a worker that stopped heartbeating is released once the lease is
    older than stale_threshold, not before."""
    h = Harness()
    await h.start()
    await h.tick()
    [job] = await h.transport.dequeue("dead-worker", h.clock.now(), limit=1)
    h.clock.advance(timedelta(seconds=30))
    assert (await h.tick(stale_threshold=60)).result("reap_stale")["released"] == 0
    h.clock.advance(timedelta(seconds=31))
    report = await h.tick(stale_threshold=timedelta(seconds=60))
    assert report.result("reap_stale")["released"] == 1
    assert report.new_work
    assert h.transport.jobs[job.id].status is JobStatus.QUEUED


async def test_due_scheduled_commands_are_dispatched() -> None:
    """Commands held by the Scheduler run in the tick once due."""
    h = Harness()
    run_id = await h.start()
    await h.scheduler.schedule(
        "cancel-later",
        {"type": "run.cancel", "workflow_run_id": run_id, "reason": "timer"},
        h.clock.now() + timedelta(hours=1),
    )
    assert (await h.tick()).result("scheduled") == {"due": 0, "dispatched": 0}
    h.clock.advance(timedelta(hours=1))
    report = await h.tick()
    assert report.result("scheduled") == {"due": 1, "dispatched": 1}
    async with h.persistence.transaction() as tx:
        run = await tx.runs.get(run_id)
    assert run is not None
    assert run.status is RunStatus.CANCELLED


async def test_failed_transition_keeps_the_poll_result() -> None:
    """A transition failing after a successful poll marks the step failed but keeps what
    the poll did, so hosts still see the resumed runs."""
    h = Harness()
    run_id = await h.start("batch-wf")
    await h.tick()
    await h.execute_all()
    h.clock.advance(timedelta(minutes=5))
    h.fail = lambda kind: kind == "run.transition"
    report = await h.tick()
    step = report.steps["poll_suspended"]
    assert not step.ok
    assert "run.transition failed" in (step.error or "")
    assert step.result is not None
    assert step.result["resumed_workflow_run_ids"] == [run_id]
    assert report.steps["flush_outbox"].ok
