"""The shared Worker loop: bounded concurrency, graceful drain, wake-ups, and backoff
while the backend fails. Real (short) waits are unavoidable here: the loop is the
thing that waits; asyncio.Events synchronise wherever the test can."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.errors import TransientStorageError
from treadle.kernel.kernel import Kernel, create_kernel
from treadle.kernel.model import Job, JobStatus, RunStatus
from treadle.runtime import Backend, Backoff, Worker, open_backend


class Num(BaseModel):
    n: int


GATE: dict[str, Any] = {}


@define_stage(id="gated", input=Num, output=Num)
async def gated(ctx):  # type: ignore[no-untyped-def]
    GATE["entered"].append(ctx.run_id)
    GATE["changed"].set()
    await GATE["open"].wait()
    return ctx.input


WF = WorkflowBuilder("gated-wf", input=Num).pipe(gated).build()


class FlakyTransport:
    """Delegates to the real transport; ``dequeue`` raises while ``down`` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False
        self.failed_dequeues = 0

    async def dequeue(
        self, worker_id: str, now: datetime, *, limit: int = 1, queues: Any = None
    ) -> list[Job]:
        if self.down:
            self.failed_dequeues += 1
            raise TransientStorageError("database unreachable")
        result: list[Job] = await self.inner.dequeue(worker_id, now, limit=limit)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    GATE.clear()
    GATE.update(entered=[], changed=asyncio.Event(), open=asyncio.Event())
    opened = await open_backend("memory://")
    yield opened
    await opened.aclose()


def _kernel(backend: Backend, transport: Any = None) -> Kernel:
    return create_kernel(
        persistence=backend.persistence,
        job_transport=transport or backend.job_transport,
        blob_store=backend.blob_store,
        event_sink=backend.event_sink,
        scheduler=backend.scheduler,
        clock=backend.clock,
        registry=[WF],
    )


async def _start(kernel: Kernel, n: int = 1) -> str:
    result = await kernel.dispatch(c.RunCreate(workflow_id="gated-wf", input={"n": n}))
    return str(result.workflow_run_id)


async def _until_entered(count: int) -> None:
    async def wait() -> None:
        while len(GATE["entered"]) < count:
            GATE["changed"].clear()
            await GATE["changed"].wait()

    await asyncio.wait_for(wait(), 1.5)


async def _status(kernel: Kernel, run_id: str) -> RunStatus:
    return (await kernel.reads.get_run(run_id, with_stages=False)).status


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    """Delays grow exponentially, stop at the cap, and start over after a success."""
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


async def test_concurrency_bounds_running_jobs(backend: Backend) -> None:
    """With concurrency=2 only two stages run at once; the others wait their turn and run
    as slots free up."""
    kernel = _kernel(backend)
    runs = [await _start(kernel, n) for n in range(4)]
    worker = Worker(kernel, concurrency=2, job_poll_interval=0.01, max_claims=10)
    async with worker:
        await _until_entered(2)
        await asyncio.sleep(0.05)  # give a third job every chance to (wrongly) start
        assert len(GATE["entered"]) == 2
        assert worker.in_flight == 2
        GATE["open"].set()
        await _until_entered(4)
    assert worker.in_flight == 0
    assert [await _status(kernel, r) for r in runs] == [RunStatus.COMPLETED] * 4


async def test_notify_claims_without_waiting_for_the_interval(backend: Backend) -> None:
    """notify() makes a run started after the first tick execute at once, although the
    orchestration interval is far longer than the test."""
    kernel = _kernel(backend)
    GATE["open"].set()
    async with Worker(kernel, orchestration_interval=60, job_poll_interval=60) as worker:
        while worker.ticks == 0:  # noqa: ASYNC110 - the first tick exposes no event to await
            await asyncio.sleep(0.005)
        await _start(kernel)
        worker.notify()
        await _until_entered(1)


async def test_a_claim_asked_as_timed_work_falls_due_is_not_lost(backend: Backend) -> None:
    """A start's wake-up that coincides with a due time: the due step runs first, and
    the claim still follows at once, not at the next tick (60 s away)."""
    kernel = _kernel(backend)
    GATE["open"].set()
    async with Worker(kernel, orchestration_interval=60, job_poll_interval=60) as worker:
        while worker.ticks == 0:  # noqa: ASYNC110 - the first tick exposes no event to await
            await asyncio.sleep(0.005)
        await _start(kernel)
        worker.note_due(kernel.deps.clock.now() - timedelta(seconds=1), "poll")
        worker.notify()  # both before the loop wakes: it sees a due time and a claim
        await _until_entered(1)


async def test_stop_drains_in_flight_jobs(backend: Backend) -> None:
    """stop() stops taking work but lets a running stage finish within drain_timeout."""
    kernel = _kernel(backend)
    run_id = await _start(kernel)
    worker = Worker(kernel, job_poll_interval=0.01)
    await worker.start()
    await _until_entered(1)
    later = await _start(kernel)
    stopping = asyncio.create_task(worker.aclose(drain_timeout=1.0))
    await asyncio.sleep(0.02)
    assert not stopping.done()
    GATE["open"].set()
    await asyncio.wait_for(stopping, 1.5)
    assert not worker.running
    assert await _status(kernel, run_id) is RunStatus.COMPLETED
    assert await _status(kernel, later) is RunStatus.PENDING  # not claimed while stopping


async def test_stop_releases_jobs_past_the_drain_timeout(backend: Backend) -> None:
    """A stage still running at the drain deadline is cancelled and its job handed back at
    once (QUEUED, stage PENDING, a stage:failed event saying it will retry), so a second
    worker finishes the run without waiting for the stale-lease threshold."""
    kernel = _kernel(backend)
    run_id = await _start(kernel)
    worker = Worker(kernel, job_poll_interval=0.01, stale_lease_threshold=3600)
    await worker.start()
    await _until_entered(1)
    await asyncio.wait_for(worker.aclose(drain_timeout=0.05), 1.0)
    assert worker.in_flight == 0
    assert await _status(kernel, run_id) is RunStatus.RUNNING
    jobs = list(backend.job_transport.jobs.values())  # type: ignore[attr-defined]
    assert [j.status for j in jobs] == [JobStatus.QUEUED]
    run = await kernel.reads.get_run(run_id)
    assert [s.status.value for s in run.stages] == ["PENDING"]
    events = await _events(backend, run_id)
    failed = [e for e in events if e.type == "stage:failed"]
    assert len(failed) == 1
    assert failed[0].will_retry  # type: ignore[attr-defined]
    GATE["open"].set()
    async with Worker(kernel, job_poll_interval=0.01, stale_lease_threshold=3600):
        await _until_entered(2)  # the stop on leaving the block drains the job
    assert await _status(kernel, run_id) is RunStatus.COMPLETED
    kinds = [e.type for e in await _events(backend, run_id)]
    assert kinds.count("stage:started") == 2
    assert kinds.count("stage:completed") == 1


async def test_second_stop_shortens_the_drain(backend: Backend) -> None:
    """A stop already draining with a long timeout is cut short by stop(drain_timeout=0)
    (the second SIGTERM), and both callers return once the job is released."""
    kernel = _kernel(backend)
    await _start(kernel)
    worker = Worker(kernel, job_poll_interval=0.01)
    await worker.start()
    await _until_entered(1)
    patient = asyncio.create_task(worker.aclose(drain_timeout=30))
    await asyncio.sleep(0)  # let the first stop begin draining
    await asyncio.wait_for(worker.aclose(drain_timeout=0), 1.0)
    await asyncio.wait_for(patient, 1.0)
    jobs = list(backend.job_transport.jobs.values())  # type: ignore[attr-defined]
    assert [j.status for j in jobs] == [JobStatus.QUEUED]


async def test_jobs_dequeued_while_stopping_are_released_not_run(backend: Backend) -> None:
    """A dequeue that returns after stop() began hands its jobs straight back: no new
    stage starts once the worker is stopping."""
    transport = _StoppingTransport(backend.job_transport)
    kernel = _kernel(backend, transport)
    run_id = await _start(kernel)
    # Claimed beforehand, so the job is queued for a dequeue (the worker's own claim would
    # chain it into a slot without one).
    await kernel.dispatch(c.RunClaimPending(worker_id="another-worker"))
    worker = Worker(kernel, job_poll_interval=0.01)
    transport.worker = worker
    await worker.start()
    await asyncio.wait_for(transport.dequeued.wait(), 1.5)
    await asyncio.wait_for(worker.aclose(drain_timeout=1.0), 1.5)
    assert GATE["entered"] == []
    jobs = list(backend.job_transport.jobs.values())  # type: ignore[attr-defined]
    assert [j.status for j in jobs] == [JobStatus.QUEUED]
    assert await _status(kernel, run_id) is RunStatus.RUNNING


class _StoppingTransport:
    """Starts the worker's stop while its dequeue is in progress (a SIGTERM at the worst
    moment), then returns the leased jobs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.worker: Worker | None = None
        self.dequeued = asyncio.Event()
        self.stop_task: asyncio.Task[None] | None = None

    async def dequeue(
        self, worker_id: str, now: datetime, *, limit: int = 1, queues: Any = None
    ) -> list[Job]:
        jobs: list[Job] = await self.inner.dequeue(worker_id, now, limit=limit)
        if jobs and self.worker is not None and self.stop_task is None:
            self.stop_task = asyncio.create_task(self.worker.aclose(drain_timeout=1.0))
            await asyncio.sleep(0)  # the stop sets its flag before we return
            self.dequeued.set()
        return jobs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def _events(backend: Backend, run_id: str) -> list[Any]:
    async with backend.persistence.transaction() as tx:
        return list(await tx.outbox.events_for_run(run_id))


async def test_job_loop_backs_off_while_dequeue_fails_and_recovers(backend: Backend) -> None:
    """While dequeue raises, the job loop retries with growing pauses instead of spinning,
    and it picks work up again once the backend answers."""
    transport = FlakyTransport(backend.job_transport)
    kernel = _kernel(backend, transport)
    transport.down = True
    GATE["open"].set()
    async with Worker(kernel, job_poll_interval=0.01, max_backoff=0.04) as worker:
        await asyncio.sleep(0.2)
        # 0.01 + 0.02 + 0.04 + 0.04 + ...: about 6 tries in 0.2 s, against 20 unthrottled.
        assert 2 <= transport.failed_dequeues <= 9
        transport.down = False
        run_id = await _start(kernel)
        worker.notify()
        await _until_entered(1)
    assert await _status(kernel, run_id) is RunStatus.COMPLETED


class _DownKernel:
    """Proxies a kernel whose every dispatch fails while ``down`` is set."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.down = True
        self.deps = kernel.deps

    async def dispatch(self, command: c.CommandBase | Mapping[str, Any]) -> Any:
        if self.down:
            raise TransientStorageError("database unreachable")
        return await self.kernel.dispatch(command)


async def test_orchestration_backs_off_while_every_step_fails(backend: Backend) -> None:
    """Ticks whose every step fails are retried with growing pauses; the first good tick
    restores the normal pace."""
    proxy = _DownKernel(_kernel(backend))
    worker = Worker(proxy, orchestration_interval=0.01, max_backoff=0.04)  # type: ignore[arg-type]
    async with worker:
        await asyncio.sleep(0.2)
        assert worker.last_tick is not None
        assert worker.last_tick.all_failed
        assert 2 <= worker.ticks <= 9
        proxy.down = False
        await asyncio.sleep(0.1)
        assert worker.last_tick.ok


async def test_a_woken_worker_claims_as_many_runs_as_it_has_free_slots(backend: Backend) -> None:
    """A claim made for free slots (``notify()``) takes a run for each of them in one
    ``run.claimPending``, all chained, however small ``max_claims`` (the full tick's
    size) is: a busy worker's slots that free together cost one claim, not one each."""
    kernel = _kernel(backend)
    GATE["open"].set()
    claims: list[int] = []
    dispatch = kernel.dispatch

    async def counting(command: Any) -> Any:
        result = await dispatch(command)
        if getattr(command, "type", None) == "run.claimPending":
            claims.append(len(result.claimed))
        return result

    kernel.dispatch = counting  # type: ignore[method-assign]
    async with Worker(
        kernel, concurrency=6, max_claims=1, orchestration_interval=60, job_poll_interval=60
    ) as worker:
        while worker.ticks == 0:  # noqa: ASYNC110 - the first tick exposes no event to await
            await asyncio.sleep(0.005)
        runs = [await _start(kernel, n) for n in range(6)]
        worker.notify()
        await _until_entered(6)
        while worker.in_flight:  # noqa: ASYNC110 - the Worker exposes a count, not an event
            await asyncio.sleep(0.005)
    assert 6 in claims  # one claim for all six free slots
    assert [await _status(kernel, r) for r in runs] == [RunStatus.COMPLETED] * 6


async def test_a_saturated_worker_keeping_up_leaves_its_full_tick_claim_out(
    backend: Backend,
) -> None:
    """While a worker's claims for freed slots keep taking runs, its full tick claims no
    run it cannot chain: one it queued would cost this same worker a dequeue and a
    phase-1 transaction later, where the next freed slot's claim starts it in the claim's
    commit. A tick with no such claim since the last one claims up to ``max_claims`` as
    before (a worker whose slots stay busy still moves PENDING runs on)."""
    kernel = _kernel(backend)
    async with Worker(
        kernel, concurrency=2, max_claims=10, orchestration_interval=60, job_poll_interval=60
    ) as worker:
        while worker.ticks == 0:  # noqa: ASYNC110 - the first tick exposes no event to await
            await asyncio.sleep(0.005)
        runs = [await _start(kernel, n) for n in range(5)]
        worker.notify()
        await _until_entered(2)  # both slots taken by the notify's chained claim
        report = await worker.tick()
        assert report.result("claim") == {"claimed": [], "chained_jobs": [], "skipped": True}
        assert [await _status(kernel, r) for r in runs].count(RunStatus.PENDING) == 3
        report = await worker.tick()  # no claim for freed slots since the last tick
        assert report.claimed_runs == 3
        GATE["open"].set()
        await _until_entered(5)
        while worker.in_flight:  # noqa: ASYNC110 - the Worker exposes a count, not an event
            await asyncio.sleep(0.005)
    assert [await _status(kernel, r) for r in runs] == [RunStatus.COMPLETED] * 5
