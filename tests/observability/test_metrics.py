"""Metrics: the counters, histograms and gauges have the values a known workload gives."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from treadle import (
    Engine,
    RetryPolicy,
    RunCancelledError,
    RunFailedError,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.adapters.otel import METRIC_NAMES, prometheus_text
from treadle.kernel import commands as c
from treadle.tests.observability.conftest import Otel


class Num(BaseModel):
    n: int


async def _prepare(n: int) -> int:
    return n


def _workflows(failures: dict[str, int]) -> list[object]:
    @define_stage(id="fetch", input=Num, output=Num)
    async def fetch(ctx: object) -> Num:
        return Num(n=ctx.input.n + 1)  # type: ignore[attr-defined]

    @define_stage(
        id="store", input=Num, output=Num, retry=RetryPolicy(max_attempts=2, initial_delay=0.01)
    )
    async def store(ctx: object) -> Num:
        failures["store"] += 1
        if failures["store"] == 1:
            raise ConnectionError("db away")
        return Num(n=ctx.input.n)  # type: ignore[attr-defined]

    @define_stage(id="explode", input=Num, output=Num, retry=RetryPolicy(max_attempts=1))
    async def explode(ctx: object) -> Num:
        raise ValueError("bad data")

    @workflow(id="waiter", input=Num, output=Num)
    async def waiter(ctx: WorkflowContext, inp: Num) -> Num:
        await ctx.step("prepare", _prepare, inp.n)
        await ctx.wait_for_signal("go", Num)
        return inp

    return [
        WorkflowBuilder("etl", input=Num).pipe(fetch).pipe(store).build(),
        WorkflowBuilder("broken", input=Num).pipe(explode).build(),
        waiter,
    ]


async def test_metrics_after_a_known_workload(otel: Otel) -> None:
    """3 good runs (one retry), 1 failed, 1 cancelled; then 2 jobs left queued."""
    workflows = _workflows({"store": 0})
    async with await Engine.open("memory://", workflows, telemetry=otel.telemetry) as engine:  # type: ignore[arg-type]
        async with engine.worker(
            concurrency=3, orchestration_interval=0.05, job_poll_interval=0.05
        ):
            good = [await engine.start("etl", {"n": i}) for i in range(3)]
            for handle in good:
                await handle.result(timeout=20)
            bad = await engine.start("broken", {"n": 1})
            waiting = await engine.start("waiter", {"n": 1})
            assert otel.points("treadle.worker.slots") == {(): 3.0}
            with pytest.raises(RunFailedError):
                await bad.result(timeout=20)
            await _event(engine, waiting.run_id, "workflow:suspended")
            await engine.cancel(waiting.run_id, reason="test")
            with pytest.raises(RunCancelledError):
                await waiting.result(timeout=20)
        # No worker now: two runs claimed by hand leave their first jobs queued.
        await engine.start("etl", {"n": 10})
        await engine.start("etl", {"n": 11})
        await engine.kernel.dispatch(c.RunClaimPending(worker_id="nobody"))
        gauges = otel.telemetry.storage_gauges(
            engine.kernel.deps.persistence,
            engine.kernel.deps.clock,
            engine.backend.workers if engine.backend is not None else None,
        )
        await gauges.refresh()

    assert otel.points("treadle.runs.started") == {
        (("workflow", "etl"),): 5.0,
        (("workflow", "broken"),): 1.0,
        (("workflow", "waiter"),): 1.0,
    }
    assert otel.points("treadle.runs.completed") == {(("workflow", "etl"),): 3.0}
    assert otel.points("treadle.runs.failed") == {(("workflow", "broken"),): 1.0}
    assert otel.points("treadle.runs.cancelled") == {(("workflow", "waiter"),): 1.0}
    stages = otel.points("treadle.stage.duration")
    key = lambda wf, stage, outcome: (("outcome", outcome), ("stage", stage), ("workflow", wf))  # noqa: E731
    assert stages[key("etl", "fetch", "completed")] == 3
    assert stages[key("etl", "store", "completed")] == 3
    assert stages[key("etl", "store", "failed")] == 1
    assert stages[key("broken", "explode", "failed")] == 1
    assert otel.points("treadle.retries") == {(("kind", "stage"), ("workflow", "etl")): 1.0}
    # Dequeued jobs are measured (here at least the retry, due after its backoff); a
    # stage chained by the commit before it, or leased by the start, waited for nothing.
    (claims,) = otel.points("treadle.claim.latency").values()
    assert claims >= 1
    depth = otel.points("treadle.queue.depth")
    assert depth[(("queue", "default"), ("status", "queued"))] == 2
    assert depth[(("queue", "default"), ("status", "leased"))] == 0
    (oldest,) = otel.points("treadle.queue.oldest_age").values()
    assert oldest >= 0
    assert otel.points("treadle.outbox.dead_letters") == {(): 0.0}
    (lag,) = otel.points("treadle.outbox.lag").values()
    assert lag >= 0
    steps = otel.points("treadle.step.duration")
    assert steps == {(("outcome", "completed"), ("step", "prepare"), ("workflow", "waiter")): 1}
    # The Prometheus exposition has every series METRIC_NAMES (and the docs) promise.
    text = prometheus_text(otel.registry).decode()
    names = {
        re.sub(r"_(bucket|sum|count|created)$", "", sample.name)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert set(METRIC_NAMES) <= names, set(METRIC_NAMES) - names


async def _event(engine: Engine, run_id: str, event_type: str) -> None:
    """Returns once the run recorded an event of ``event_type`` (tails its events)."""
    async for event in engine.events(run_id, follow=True, poll_interval=0.02):
        if event.type == event_type:
            return
    raise AssertionError(f"run {run_id} ended without {event_type}")
