"""The shared Worker loop: bounded concurrency, graceful drain, wake-ups, and backoff
while the backend fails. Real (short) waits are unavoidable here: the loop is the
thing that waits; asyncio.Events synchronise wherever the test can."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
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

    async def dequeue(self, worker_id: str, now: datetime, *, limit: int = 1) -> list[Job]:
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
    await opened.close()


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
    return (await kernel.get_run(run_id, with_stages=False)).status


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


async def test_stop_drains_in_flight_jobs(backend: Backend) -> None:
    """stop() stops taking work but lets a running stage finish within drain_timeout."""
    kernel = _kernel(backend)
    run_id = await _start(kernel)
    worker = Worker(kernel, job_poll_interval=0.01)
    await worker.start()
    await _until_entered(1)
    later = await _start(kernel)
    stopping = asyncio.create_task(worker.stop(drain_timeout=1.0))
    await asyncio.sleep(0.02)
    assert not stopping.done()
    GATE["open"].set()
    await asyncio.wait_for(stopping, 1.5)
    assert not worker.running
    assert await _status(kernel, run_id) is RunStatus.COMPLETED
    assert await _status(kernel, later) is RunStatus.PENDING  # not claimed while stopping


async def test_stop_cancels_jobs_past_the_drain_timeout(backend: Backend) -> None:
    """A stage still running at the drain deadline is cancelled; its job stays leased for
    lease.reapStale to hand to another worker."""
    kernel = _kernel(backend)
    run_id = await _start(kernel)
    worker = Worker(kernel, job_poll_interval=0.01)
    await worker.start()
    await _until_entered(1)
    await asyncio.wait_for(worker.stop(drain_timeout=0.05), 1.0)
    assert worker.in_flight == 0
    assert await _status(kernel, run_id) is RunStatus.RUNNING
    jobs = list(backend.job_transport.jobs.values())  # type: ignore[attr-defined]
    assert [j.status for j in jobs] == [JobStatus.LEASED]


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
