"""Retention (``run.purge``) end to end on every backend: the maintenance tick purges
terminal runs past their workflow's ``retention`` or the engine's default, with their
artifacts and offloaded payloads; ``Engine.purge`` does it on demand; and no run that
is not terminal is ever purged, whatever its status (paused runs included)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from pydantic import BaseModel

from treadle import (
    Engine,
    NonRetryableError,
    RunStatus,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel import commands as c
from treadle.kernel.errors import RunNotFoundError, TreadleValidationError
from treadle.runtime.tick import maintenance_tick
from treadle.testing import FakeClock
from treadle.tests.scenario.helpers import run_events


class N(BaseModel):
    n: int
    pad: str = ""


@define_stage(id="make", input=N, output=N)
async def make(ctx):  # type: ignore[no-untyped-def]
    await ctx.artifacts.put("note.txt", "kept with the run")
    ctx.log("info", "made", n=ctx.input.n)
    if ctx.input.n < 0:
        raise NonRetryableError("negative")
    return N(n=ctx.input.n, pad="x" * 200)  # offloaded past payload_max_bytes=64


@define_stage(id="finish", input=N, output=N)
async def finish(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


SHORT = WorkflowBuilder("short", input=N, retention=timedelta(days=1)).pipe(make).build()
PLAIN = WorkflowBuilder("plain", input=N).pipe(make).pipe(finish).build()


@workflow(id="waits", input=N, output=int, signals={"go": N}, retention=timedelta(days=1))
async def waits(ctx: WorkflowContext, order: N) -> int:
    got: N = await ctx.wait_for_signal("go", N)
    return order.n + got.n


WORKFLOWS = [SHORT, PLAIN, waits]


@pytest.fixture
async def offloading(url: str, clock: FakeClock) -> AsyncIterator[Engine]:
    """The backend with a 64-byte payload threshold (memory never offloads) and an
    engine default retention of 30 days."""
    async with await Engine.open(
        url, workflows=WORKFLOWS, clock=clock, payload_max_bytes=64, retention=timedelta(days=30)
    ) as opened:
        yield opened


async def drain(engine: Engine, clock: FakeClock) -> None:
    kernel = engine.kernel
    for _ in range(20):
        report = await maintenance_tick(kernel, worker_id="w")
        jobs = await kernel.deps.job_transport.dequeue("w", clock.now(), limit=10)
        for job in jobs:
            await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
        if not jobs and not report.claimed_runs:
            return


async def exists(engine: Engine, run_id: str) -> bool:
    try:
        await engine.get_run(run_id)
    except RunNotFoundError:
        return False
    return True


async def blobs(engine: Engine, run_id: str) -> list[str]:
    store = engine.kernel.deps.blob_store
    return [*await store.list(f"runs/{run_id}/"), *await store.list(f"payloads/{run_id}/")]


async def every_status(engine: Engine, clock: FakeClock) -> dict[str, str]:
    """One run per status, and paused ones, all ended (or started) long ago."""
    runs: dict[str, str] = {}
    for name in ("COMPLETED", "FAILED", "CANCELLED", "TERMINATED"):
        runs[name] = (await engine.start("plain", {"n": -1 if name == "FAILED" else 1})).run_id
    await engine.cancel(runs["CANCELLED"])
    await engine.terminate(runs["TERMINATED"])
    await drain(engine, clock)
    for name in ("SUSPENDED", "SUSPENDED-paused"):
        runs[name] = (await engine.start("waits", {"n": 1})).run_id
    await drain(engine, clock)
    await engine.pause(runs["SUSPENDED-paused"])
    for name in ("RUNNING", "RUNNING-paused"):
        runs[name] = (await engine.start("plain", {"n": 1})).run_id
    await maintenance_tick(engine.kernel, worker_id="w")  # claimed; their jobs queued
    await engine.pause(runs["RUNNING-paused"])
    for name in ("PENDING", "PENDING-paused"):
        runs[name] = (await engine.start("plain", {"n": 1})).run_id
    await engine.pause(runs["PENDING-paused"])
    return runs


async def test_nothing_that_is_not_terminal_is_ever_purged(
    offloading: Engine, clock: FakeClock
) -> None:
    """A run in every status (and paused ones) a year old: the tick's ``run.purge`` and
    then ``purge(older_than=0)`` delete exactly the terminal runs, with their events,
    logs and blobs; every other run keeps its stages, events and status unchanged."""
    engine = offloading
    runs = await every_status(engine, clock)
    statuses = {name: (await engine.get_run(run_id)).status for name, run_id in runs.items()}
    assert {s.value for s in statuses.values()} == {s.value for s in RunStatus}
    live = {name: run_id for name, run_id in runs.items() if not statuses[name].terminal}
    before = {
        run_id: (await engine.get_run(run_id), await run_events(engine, run_id))
        for run_id in live.values()
    }
    clock.advance(timedelta(days=365))
    # The tick's command alone (a whole tick would also claim the PENDING run and reap
    # the RUNNING ones, changing what this test compares).
    assert (await engine.kernel.dispatch(c.RunPurge())).purged == 4
    result = await engine.purge(timedelta(0))
    assert result.purged == 0
    for name, run_id in runs.items():
        assert await exists(engine, run_id) is (name in live), name
        if name not in live:
            assert await blobs(engine, run_id) == []
            async with engine.kernel.deps.persistence.transaction() as tx:
                assert await tx.outbox.events_for_run(run_id) == []
                assert await tx.logs.for_run(run_id) == []
    for run_id, (run, events) in before.items():
        assert await engine.get_run(run_id) == run
        assert await run_events(engine, run_id) == events


async def test_the_tick_keeps_each_workflow_for_its_own_retention(
    offloading: Engine, clock: FakeClock
) -> None:
    """``short`` keeps its runs a day, ``plain`` the engine's 30 days; each is purged by
    the tick once its own retention has passed, with its artifacts and payload blobs."""
    engine = offloading
    short = (await engine.start("short", {"n": 1})).run_id
    plain = (await engine.start("plain", {"n": 1})).run_id
    await drain(engine, clock)
    assert await blobs(engine, short)  # an artifact (and, on SQL, an offloaded payload)
    clock.advance(timedelta(hours=23))
    await maintenance_tick(engine.kernel, worker_id="w")
    assert await exists(engine, short)
    clock.advance(timedelta(hours=2))
    await maintenance_tick(engine.kernel, worker_id="w")
    assert not await exists(engine, short)
    assert await blobs(engine, short) == []
    assert await exists(engine, plain)
    clock.advance(timedelta(days=30))
    await maintenance_tick(engine.kernel, worker_id="w")
    assert not await exists(engine, plain)
    assert await blobs(engine, plain) == []


async def test_purge_on_demand_by_status_dry_run_and_batches(
    engine: Engine, clock: FakeClock
) -> None:
    """``Engine.purge``: ``dry_run`` counts and deletes nothing; ``status`` narrows it;
    batches go on until every expired run is gone; newer runs stay. ``plain`` has no
    retention and the engine fixture no default, so the tick keeps its runs."""
    ok = [(await engine.start("plain", {"n": 1})).run_id for _ in range(3)]
    failed = (await engine.start("plain", {"n": -1})).run_id
    await drain(engine, clock)
    clock.advance(timedelta(days=40))
    report = await maintenance_tick(engine.kernel, worker_id="w")
    assert (report.steps["purge"].result or {})["purged"] == 0  # only ``short`` expires
    recent = (await engine.start("plain", {"n": 2})).run_id
    await drain(engine, clock)
    dry = await engine.purge(timedelta(days=30), dry_run=True)
    assert dry.dry_run
    assert sorted(dry.workflow_run_ids) == sorted([*ok, failed])
    assert all([await exists(engine, run_id) for run_id in ok])
    only_failed = await engine.purge(timedelta(days=30), status="FAILED")
    assert only_failed.workflow_run_ids == [failed]
    rest = await engine.purge(timedelta(days=30), batch_size=2)
    assert sorted(rest.workflow_run_ids) == sorted(ok)
    assert await exists(engine, recent)
    assert not any([await exists(engine, run_id) for run_id in ok])


async def test_bad_purge_arguments_name_the_argument(engine: Engine) -> None:
    """A live status, a negative age or a bad batch size is refused before anything."""
    for kwargs, named in (
        ({"status": "RUNNING"}, "status"),
        ({"older_than": -5}, "older_than"),
        ({"batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(TreadleValidationError, match=named):
            await engine.purge(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(TreadleValidationError, match="retention"):
        await Engine.open("memory://", retention=-1)
