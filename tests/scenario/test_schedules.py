"""Cron schedules on memory, SQLite and PostgreSQL: one run per fire time whichever
ticks fire it, catch-up and overlap policies, management through ``engine.schedules``,
bad input refused with nothing written, and the due time that wakes a worker."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from treadle import (
    Engine,
    InvalidCommandError,
    InvalidInputError,
    RunStatus,
    ScheduleNotFoundError,
    WorkflowContext,
    WorkflowNotFoundError,
    define_schedule,
    workflow,
)
from treadle.kernel import commands as c
from treadle.runtime.due import next_due_times
from treadle.runtime.tick import maintenance_tick
from treadle.testing import FakeClock

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Report(BaseModel):
    name: str


@workflow(id="report", input=Report)
async def report(ctx: WorkflowContext, data: Report) -> str:
    return data.name


@workflow(id="beat", input=None, schedule="*/5 * * * *")
async def beat(ctx: WorkflowContext, _: None) -> str:
    return "beat"


@workflow(id="waiter", input=None)
async def waiter(ctx: WorkflowContext, _: None) -> str:
    await ctx.wait_for_signal("go")
    return "done"


WORKFLOWS = [report, beat, waiter]


async def _runs(engine: Engine, workflow_id: str) -> list[str]:
    """Fire times of the workflow's runs, sorted."""
    runs = await engine.list(workflow_id=workflow_id, limit=1000)
    return sorted(str(r.search_attributes["treadle.fire_time"]) for r in runs)


async def _fire(engine: Engine) -> c.ScheduleFireDueResult:
    return await engine.kernel.dispatch(c.ScheduleFireDue())


async def test_declared_schedule_fires_once_per_fire_time(url: str, clock: FakeClock) -> None:
    """``@workflow(schedule=...)`` is created at open; ticks fire each fire time once,
    however often they run, and the scheduled run completes."""
    clock.set(T0)
    async with await Engine.open(url, workflows=WORKFLOWS, clock=clock) as engine:
        (schedule,) = await engine.schedules.list()
        assert (schedule.id, schedule.declared, schedule.next_fire_at) == (
            "beat",
            True,
            T0 + timedelta(minutes=5),
        )
        for minute in (4, 5, 5, 7, 10, 10):
            clock.set(T0 + timedelta(minutes=minute))
            await maintenance_tick(engine.kernel, worker_id="w")
        assert await _runs(engine, "beat") == [
            "2026-01-01T00:05:00+00:00",
            "2026-01-01T00:10:00+00:00",
        ]
        async with engine.worker(concurrency=2):
            runs = await engine.list(workflow_id="beat")
            assert await engine.handle(runs[0].id).result(timeout=30) == "beat"
        stored = await engine.schedules.get("beat")
        assert stored.last_fire_at == T0 + timedelta(minutes=10)
        assert stored.next_fire_at == T0 + timedelta(minutes=15)


async def test_two_engines_racing_on_one_database_start_one_run_per_fire_time(
    url: str, clock: FakeClock
) -> None:
    """Two engines (two workers, or a worker and a Lambda tick) firing the same due
    schedule at once start exactly one run per fire time, and one ``schedule:fired``."""
    if url == "memory://":
        pytest.skip("two engines share a database only on SQL backends")
    clock.set(T0)
    spec = define_schedule(
        "report",
        cron="* * * * *",
        input={"name": "r"},
        id="every-minute",
        catchup="all",
        max_catchup=30,
    )
    first = await Engine.open(url, workflows=[report], clock=clock, schedules=[spec])
    second = await Engine.open(url, workflows=[report], clock=clock, schedules=[spec])
    try:
        for step in range(1, 4):
            clock.set(T0 + timedelta(minutes=7 * step, seconds=30))
            results = await asyncio.gather(*(_fire(e) for e in (first, second, first, second)))
            assert sum(r.fired for r in results) == 7
        times = [
            t
            for r in await first.list(workflow_id="report", limit=1000)
            for t in [r.search_attributes["treadle.fire_time"]]
        ]
        assert len(times) == len(set(times)) == 21
        fired = [
            e
            for e in await first.kernel.reads.events("schedule:every-minute")
            if e.type == "schedule:fired"
        ]
        assert len(fired) == 21
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize(
    ("catchup", "expected_runs", "skipped_count"),
    [("skip", 0, 12), ("latest", 1, 11), ("all", 5, 7)],
)
async def test_catch_up_after_downtime(
    url: str, clock: FakeClock, catchup: str, expected_runs: int, skipped_count: int | None
) -> None:
    """An hour without ticks (12 fire times missed): ``skip`` fires none, ``latest`` the
    newest, ``all`` the newest ``max_catchup``; the rest are reported skipped."""
    clock.set(T0)
    async with await Engine.open(url, workflows=[report], clock=clock) as engine:
        await engine.schedules.create(
            "hourly-report",
            "report",
            cron="*/5 * * * *",
            input=Report(name="r"),
            catchup=catchup,  # type: ignore[arg-type]
            max_catchup=5,
            misfire_grace=timedelta(minutes=1),
        )
        clock.set(T0 + timedelta(hours=1, minutes=2))
        result = await _fire(engine)
        assert result.fired == expected_runs
        times = await _runs(engine, "report")
        if expected_runs:
            assert times[-1] == "2026-01-01T01:00:00+00:00"
        (skipped,) = [
            e
            for e in await engine.kernel.reads.events("schedule:hourly-report")
            if e.type == "schedule:skipped"
        ]
        assert skipped.reason == "missed"  # type: ignore[attr-defined]
        assert skipped.missed_count == skipped_count  # type: ignore[attr-defined]
        assert skipped.missed_since == T0 + timedelta(minutes=5)  # type: ignore[attr-defined]
        assert (await engine.schedules.get("hourly-report")).next_fire_at == T0 + timedelta(
            hours=1, minutes=5
        )


async def test_skip_fires_a_fire_time_still_within_its_grace(url: str, clock: FakeClock) -> None:
    """``skip`` is about downtime: a tick a little late (within ``misfire_grace``) fires."""
    clock.set(T0)
    async with await Engine.open(url, workflows=[report], clock=clock) as engine:
        await engine.schedules.create(
            "s", "report", cron="*/5 * * * *", input={"name": "x"}, catchup="skip"
        )
        clock.set(T0 + timedelta(minutes=6))
        assert (await _fire(engine)).fired == 1


@pytest.mark.parametrize("overlap", ["skip", "cancel_previous", "allow"])
async def test_overlap_policy(url: str, clock: FakeClock, overlap: str) -> None:
    """A fire time while the previous run still waits: ``skip`` starts nothing,
    ``cancel_previous`` cancels it and starts one, ``allow`` starts one beside it."""
    clock.set(T0)
    async with await Engine.open(url, workflows=[waiter], clock=clock) as engine:
        await engine.schedules.create("w", "waiter", cron="0 * * * *", overlap=overlap)  # type: ignore[arg-type]
        clock.set(T0 + timedelta(hours=1))
        await maintenance_tick(engine.kernel, worker_id="w")
        (first,) = await engine.list(workflow_id="waiter")
        clock.set(T0 + timedelta(hours=2))
        result = await _fire(engine)
        runs = {r.id: r for r in await engine.list(workflow_id="waiter")}
        if overlap == "skip":
            assert (result.fired, result.skipped, list(runs)) == (0, 1, [first.id])
            events = await engine.kernel.reads.events("schedule:w")
            skipped = [e for e in events if e.type == "schedule:skipped"]
            assert skipped[0].run_id == first.id  # type: ignore[attr-defined]
        else:
            assert result.fired == 1
            assert len(runs) == 2
            if overlap == "cancel_previous":
                assert runs[first.id].status is RunStatus.CANCELLED
            else:
                assert not runs[first.id].status.terminal


async def test_manage_pause_resume_trigger_update_delete(url: str, clock: FakeClock) -> None:
    """Pause stops fires (no catch-up on resume); trigger starts a run even paused;
    update reschedules; delete removes the schedule and keeps its runs."""
    clock.set(T0)
    async with await Engine.open(url, workflows=[report], clock=clock) as engine:
        await engine.schedules.create("s", "report", cron="0 * * * *", input={"name": "a"})
        paused = await engine.schedules.pause("s")
        assert paused.paused
        assert paused.next_fire_at is None
        clock.set(T0 + timedelta(hours=3, minutes=10))
        assert (await _fire(engine)).fired == 0
        run_id = await engine.schedules.trigger("s")
        assert run_id is not None
        assert (await engine.get_run(run_id)).input == {"name": "a"}
        resumed = await engine.schedules.resume("s")
        assert resumed.next_fire_at == T0 + timedelta(hours=4)
        updated = await engine.schedules.update("s", cron="30 * * * *", input={"name": "b"})
        assert updated.next_fire_at == T0 + timedelta(hours=3, minutes=30)
        assert [s.id for s in await engine.schedules.list(paused=False)] == ["s"]
        assert await engine.schedules.delete("s") is True
        assert await engine.schedules.delete("s") is False
        with pytest.raises(ScheduleNotFoundError):
            await engine.schedules.get("s")
        assert len(await engine.list(workflow_id="report")) == 1
        changes = [
            e.change  # type: ignore[attr-defined]
            for e in await engine.kernel.reads.events("schedule:s")
            if e.type == "schedule:changed"
        ]
        assert changes == ["created", "paused", "resumed", "updated", "deleted"]


async def test_bad_schedules_are_refused_naming_the_field(url: str, clock: FakeClock) -> None:
    """A bad expression, timezone, workflow or input raises naming it; nothing is written."""
    async with await Engine.open(url, workflows=[report], clock=clock) as engine:
        with pytest.raises(InvalidCommandError) as bad_cron:
            await engine.schedules.create("s", "report", cron="61 * * * *", input={"name": "a"})
        assert bad_cron.value.errors[0][0] == "cron"
        with pytest.raises(InvalidCommandError) as bad_tz:
            await engine.schedules.create(
                "s", "report", cron="0 * * * *", timezone="Mars/Base", input={"name": "a"}
            )
        assert bad_tz.value.errors[0][0] == "timezone"
        with pytest.raises(WorkflowNotFoundError):
            await engine.schedules.create("s", "nope", cron="0 * * * *")
        with pytest.raises(InvalidInputError) as bad_input:
            await engine.schedules.create("s", "report", cron="0 * * * *", input={"nom": 1})
        assert "input.name" in str(bad_input.value)
        with pytest.raises(ScheduleNotFoundError):
            await engine.schedules.pause("s")
        assert await engine.schedules.list() == []


async def test_a_schedule_write_tells_workers_its_fire_time(url: str, clock: FakeClock) -> None:
    """The next fire time is a due time of kind ``schedule``: storage reports it to a
    worker after a tick, and on SQL the committing transaction tells the watchers."""
    clock.set(T0)
    async with await Engine.open(url, workflows=[report], clock=clock) as engine:
        told: list[object] = []
        watch = getattr(engine.kernel.deps.persistence, "watch_due", None)
        if watch is not None:
            watch(told.append)
        await engine.schedules.create("s", "report", cron="0 3 * * *", input={"name": "a"})
        at_three = T0 + timedelta(hours=3)
        assert (await next_due_times(engine.kernel))["schedule"] == at_three
        if watch is not None:
            assert {"schedule": at_three} in told
