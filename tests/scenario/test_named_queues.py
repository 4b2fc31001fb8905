"""Named queues: a stage or code workflow on a queue runs only on a worker serving it.

A worker serves ``("default",)`` unless given ``queues=``; a commit never leases (chains)
a job of another queue to it, and ``dequeue`` skips such jobs, so they wait, visible in
``engine.queues()`` as unserved, until a worker of that queue starts."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from treadle import (
    DefinitionError,
    Engine,
    RunStatus,
    StageContext,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel.model import QueueInfo
from treadle.runtime.worker import Worker
from treadle.tests.scenario.helpers import run_events, until


class N(BaseModel):
    n: int


@define_stage(id="prepare", input=N, output=N)
async def prepare(ctx: StageContext[N, None]) -> N:
    return N(n=ctx.input.n + 1)


@define_stage(id="render", input=N, output=N, queue="gpu")
async def render(ctx: StageContext[N, None]) -> N:
    return N(n=ctx.input.n * 10)


@define_stage(id="publish", input=N, output=N)
async def publish(ctx: StageContext[N, None]) -> N:
    return N(n=ctx.input.n + 2)


async def _double(n: int) -> int:
    return n * 2


@workflow(id="io-bound", input=N, output=N, queue="io")
async def io_bound(ctx: WorkflowContext, data: N) -> N:
    return N(n=await ctx.step("double", _double, data.n))


ROUTED = WorkflowBuilder("routed", input=N).pipe(prepare).pipe(render).pipe(publish).build()
WORKFLOWS = [ROUTED, io_bound]


def _worker(engine: Engine, worker_id: str, *queues: str) -> Worker:
    options = {"queues": queues} if queues else {}
    return engine.worker(
        concurrency=2,
        worker_id=worker_id,
        orchestration_interval=0.02,
        job_poll_interval=0.02,
        **options,
    )


async def _queue(engine: Engine, name: str) -> QueueInfo:
    return next(q for q in await engine.queues() if q.queue == name)


async def test_a_stage_on_a_named_queue_waits_for_a_worker_of_that_queue(engine: Engine) -> None:
    """``render`` is on ``gpu``: the default worker runs ``prepare`` and leaves ``render``
    queued (reported unserved), a ``gpu`` worker runs it, and ``publish`` (default queue)
    goes back to the default worker, never chained onto the gpu one."""
    async with _worker(engine, "cpu-worker"):
        handle = await engine.start("routed", {"n": 1})

        async def render_waits() -> bool:
            return (await _queue(engine, "gpu")).queued == 1

        await until(render_waits)
        gpu = await _queue(engine, "gpu")
        assert gpu.unserved
        assert gpu.declared
        assert gpu.workers == ()
        run = await engine.get_run(handle.run_id)
        assert run.status is RunStatus.RUNNING
        assert {s.stage_id: s.status.value for s in run.stages} == {
            "prepare": "COMPLETED",
            "render": "PENDING",
            "publish": "PENDING",
        }
        default = await _queue(engine, "default")
        assert default.workers == ("cpu-worker",)
        assert not default.unserved

        async with _worker(engine, "gpu-worker", "gpu"):
            assert await handle.result(timeout=20) == {"n": 22}
    started = {
        e.stage_id: e.worker_id  # type: ignore[attr-defined]
        for e in await run_events(engine, handle.run_id)
        if e.type == "stage:started"  # type: ignore[attr-defined]
    }
    assert started == {
        "prepare": "cpu-worker",
        "render": "gpu-worker",
        "publish": "cpu-worker",
    }
    # A commit that asked to chain but could not (the next stage's queue is not the
    # worker's) still records its own events: every stage completed, in order.
    completed = [
        e.stage_id  # type: ignore[attr-defined]
        for e in await run_events(engine, handle.run_id)
        if e.type == "stage:completed"  # type: ignore[attr-defined]
    ]
    assert completed == ["prepare", "render", "publish"]


async def test_a_code_workflow_runs_on_its_queue(engine: Engine) -> None:
    """``@workflow(queue="io")``: its body and steps run only on a worker serving ``io``
    (here one serving two queues), never on a default worker."""
    async with _worker(engine, "cpu-worker"):
        handle = await engine.start("io-bound", {"n": 4})

        async def waits_on_io() -> bool:
            return (await _queue(engine, "io")).queued == 1

        await until(waits_on_io)
        assert (await engine.get_run(handle.run_id)).status is RunStatus.RUNNING
        async with _worker(engine, "io-worker", "io", "gpu"):
            assert await handle.result(timeout=20) == {"n": 8}
            io = await _queue(engine, "io")
            assert io.workers == ("io-worker",)
            assert (await _queue(engine, "gpu")).workers == ("io-worker",)
    assert (await _queue(engine, "io")).queued == 0


async def test_a_worker_is_listed_from_its_start_until_it_stops(engine: Engine) -> None:
    """A worker is in the registry as soon as ``start`` returns (before any tick), and a
    worker that stops cleanly is no longer reported as serving its queues."""
    async with _worker(engine, "brief", "gpu"):
        assert (await _queue(engine, "gpu")).workers == ("brief",)
    assert (await _queue(engine, "gpu")).workers == ()


def test_queue_names_are_checked_where_they_are_declared() -> None:
    """A bad queue name fails at definition time, naming the stage or workflow."""
    with pytest.raises(DefinitionError, match=r"stage 'x'.*queue"):
        define_stage(id="x", input=N, output=N, queue="no spaces")
    with pytest.raises(DefinitionError, match=r"workflow 'w'.*queue"):
        WorkflowBuilder("w", input=N, queue="")
    with pytest.raises(DefinitionError, match=r"workflow 'c'.*queue"):
        workflow(id="c", input=N, queue="a/b")


async def test_worker_queues_are_checked(engine: Engine) -> None:
    with pytest.raises(ValueError, match="queues: queue must be"):
        engine.worker(queues=["ok", "not ok"])
    with pytest.raises(ValueError, match="name at least one queue"):
        engine.worker(queues=[])
