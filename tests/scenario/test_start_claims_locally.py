"""A start in a process whose worker has a free slot claims the run for that worker in
the start's own commit: one transaction creates the run, starts it and starts its
first stage, and the worker runs it without a claim or a wake-up."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from treadle import Engine, RunStatus, StageContext, StageStatus, WorkflowBuilder, define_stage
from treadle.tests.scenario.helpers import WAIT, run_events, until, worker


class N(BaseModel):
    n: int


GATE: dict[str, asyncio.Event] = {}


@define_stage(id="first", input=N, output=N)
async def first(ctx: StageContext[N, None]) -> N:
    entered = GATE.get("entered")
    if entered is not None:
        entered.set()
    gate = GATE.get("gate")
    if gate is not None:
        await gate.wait()
    return ctx.input


WORKFLOWS = [WorkflowBuilder("wf", input=N).pipe(first).build()]


class _CountCommits:
    """Counts the transactions the calling task opens on the engine's persistence (the
    worker's own loops run concurrently and are not counted)."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        self._task = asyncio.current_task()
        persistence: Any = engine.kernel.deps.persistence
        original = persistence.transaction

        def counted(**kw: Any) -> Any:
            if asyncio.current_task() is self._task:
                self.count += 1
            return original(**kw)

        persistence.transaction = counted
        self.stop = lambda: setattr(persistence, "transaction", original)


async def test_a_start_with_a_free_local_slot_is_claimed_in_its_own_commit(
    engine: Engine,
) -> None:
    """engine.start commits once; when it returns the run is RUNNING with its first
    stage started by the local worker, and the events created, started and
    stage:started share the start's commit (one timestamp)."""
    GATE["gate"] = gate = asyncio.Event()
    try:
        async with worker(engine, concurrency=2) as w:
            commits = _CountCommits(engine)
            handle = await engine.start("wf", {"n": 1})
            assert commits.count == 1
            commits.stop()
            run = await engine.get_run(handle.run_id)
            assert run.status is RunStatus.RUNNING
            assert run.worker_id == w.worker_id
            assert run.stages[0].status is StageStatus.RUNNING
            types = [(e.type, e.timestamp) for e in await run_events(engine, handle.run_id)]  # type: ignore[attr-defined]
            assert [t for t, _ in types] == [
                "workflow:created",
                "workflow:started",
                "stage:started",
            ]
            assert len({at for _, at in types}) == 1
            gate.set()
            assert await handle.result(timeout=WAIT) == {"n": 1}
    finally:
        GATE.clear()


async def test_without_a_free_slot_the_run_waits_for_a_claim(engine: Engine) -> None:
    """With the worker's only slot busy the new run stays PENDING (nothing is held for
    it), and is claimed and completed once the slot frees."""
    GATE["gate"] = gate = asyncio.Event()
    GATE["entered"] = entered = asyncio.Event()
    try:
        # No full tick while the runs start: a tick claims PENDING runs whatever the free
        # slots, so the worker's boot tick must be over and the next one far away.
        w = engine.worker(concurrency=1, orchestration_interval=60, job_poll_interval=60)
        async with w:
            await until(lambda: w.ticks >= 1)
            busy = await engine.start("wf", {"n": 1})
            # The slot is busy once the first run's body runs. (The start itself may find
            # the slot held by a claim the worker's wake-ups run meanwhile, and leave the
            # run PENDING for that claim: either way the body takes the only slot.)
            await asyncio.wait_for(entered.wait(), WAIT)
            waiting = await engine.start("wf", {"n": 2})
            assert (await engine.get_run(waiting.run_id)).status is RunStatus.PENDING
            gate.set()
            assert await busy.result(timeout=WAIT) == {"n": 1}
            assert await waiting.result(timeout=WAIT) == {"n": 2}
    finally:
        GATE.clear()


async def test_an_idempotent_restart_hands_nothing_to_the_worker(engine: Engine) -> None:
    """A second start with the same idempotency key returns the first run and leases
    nothing: the run completes once, its stage ran once."""
    async with worker(engine, concurrency=2):
        one = await engine.start("wf", {"n": 3}, idempotency_key="k")
        assert await one.result(timeout=WAIT) == {"n": 3}
        two = await engine.start("wf", {"n": 3}, idempotency_key="k")
        assert two.run_id == one.run_id
    run = await engine.get_run(one.run_id)
    assert run.stages[0].attempt == 1
    started = [e for e in await run_events(engine, one.run_id) if e.type == "stage:started"]  # type: ignore[attr-defined]
    assert len(started) == 1


async def test_runs_started_one_at_a_time_cost_the_worker_no_dequeue(engine: Engine) -> None:
    """A worker whose queue was found drained does not dequeue when a run it was handed
    finishes (nothing was queued meanwhile): ten runs, one after the other, and no
    dequeue beyond the worker's first. A job queued by another start wakes it still."""
    transport: Any = engine.kernel.deps.job_transport
    original = transport.dequeue
    dequeues: list[int] = []
    first_dequeue = asyncio.Event()

    async def counted(*args: Any, **kw: Any) -> Any:
        jobs = await original(*args, **kw)
        dequeues.append(len(jobs))
        first_dequeue.set()
        return jobs

    transport.dequeue = counted
    wake_source: Any = engine.backend.wake_source if engine.backend else None
    if wake_source is not None:  # connected first: its catch-up wake-up comes before
        engine.run_waiters.forget("-", engine.run_waiters.waiter("-"))  # subscribes
        await wake_source.wait_listening()
    try:
        async with engine.worker(concurrency=2, job_poll_interval=60.0):
            await asyncio.wait_for(first_dequeue.wait(), WAIT)  # it finds the queue empty
            for i in range(10):
                handle = await engine.start("wf", {"n": i})
                assert await asyncio.wait_for(handle.result(), WAIT) == {"n": i}
            assert dequeues == [0]
            # A start that finds no free slot queues its run for any worker: its wake-up
            # ends the drained state, and the worker dequeues and runs it.
            GATE["gate"] = gate = asyncio.Event()
            held = [await engine.start("wf", {"n": 100 + i}) for i in range(2)]
            queued = await engine.start("wf", {"n": 200})
            gate.set()
            assert await asyncio.wait_for(queued.result(), WAIT) == {"n": 200}
            for h in held:
                await asyncio.wait_for(h.result(), WAIT)
    finally:
        transport.dequeue = original
        GATE.clear()
