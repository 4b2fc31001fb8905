"""A worker starts a scheduled run at its fire time, not at its next tick: the fire time
is a due time (kind ``schedule``) that the worker sleeps until, whether the schedule was
made through its own engine or (PostgreSQL) by another process. The real clock, with a
test calendar that fires every half second (cron's minute is too coarse for a test)."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta

import pytest

from treadle import Engine, WorkflowContext, workflow
from treadle.runtime.backends import open_backend

PERIOD = 0.5
"""Seconds between fire times of the test calendar."""
LATE = 5.0
"""How late the run may start and still pass; without the wake-up it would wait for the
worker's 60 s tick."""
SLOW = 60.0

STARTED: list[asyncio.Event] = []


class HalfSecondCalendar:
    """A CronCalendar whose every expression fires at each multiple of ``PERIOD``."""

    def check(self, expression: str, timezone: str) -> None:
        return None

    def next_after(self, expression: str, timezone: str, after: datetime) -> datetime | None:
        ticks = math.floor(after.timestamp() / PERIOD) + 1
        return datetime.fromtimestamp(ticks * PERIOD, UTC)

    def previous_before(self, expression: str, timezone: str, before: datetime) -> datetime | None:
        ticks = math.ceil(before.timestamp() / PERIOD) - 1
        return datetime.fromtimestamp(ticks * PERIOD, UTC)


@workflow(id="pulse", input=None)
async def pulse(ctx: WorkflowContext, _: None) -> str:
    if STARTED:
        STARTED[-1].set()
    return "ok"


async def _engine(url: str) -> Engine:
    backend = await open_backend(url)
    kernel = backend.kernel([pulse], cron=HalfSecondCalendar())
    return Engine(kernel, backend)


async def _fires_in_time(worker_engine: Engine, origin: Engine) -> None:
    async with worker_engine.worker(orchestration_interval=SLOW, job_poll_interval=SLOW):
        backend = worker_engine.backend
        if backend is not None and backend.wake_source is not None:
            await backend.wake_source.wait_listening()  # type: ignore[attr-defined]
        STARTED.append(asyncio.Event())
        await origin.schedules.create("p", "pulse", cron="* * * * *", overlap="skip")
        await asyncio.wait_for(STARTED[-1].wait(), LATE)
        STARTED.append(asyncio.Event())  # the next fire time: learned from the fire's commit
        await asyncio.wait_for(STARTED[-1].wait(), LATE)
    runs = await origin.list(workflow_id="pulse")
    assert all(r.search_attributes["treadle.schedule_id"] == "p" for r in runs)
    assert runs[0].created_at - datetime.fromisoformat(
        str(runs[0].search_attributes["treadle.fire_time"])
    ) < timedelta(seconds=LATE)


async def test_a_worker_starts_a_scheduled_run_at_its_fire_time(url: str) -> None:
    """A schedule made through the worker's own engine fires at its fire time, then
    again at the next one, though the worker's tick and poll are 60 s away."""
    engine = await _engine(url)
    try:
        await _fires_in_time(engine, engine)
    finally:
        STARTED.clear()
        await engine.close()


@pytest.mark.postgres
async def test_a_schedule_another_process_made_fires_on_time(treadle_postgres_url: str) -> None:
    """Made by another process: the commit's NOTIFY (``due:schedule=...``) tells the
    worker when it fires."""
    worker_engine = await _engine(treadle_postgres_url)
    origin = await _engine(treadle_postgres_url)
    try:
        await _fires_in_time(worker_engine, origin)
    finally:
        STARTED.clear()
        await origin.close()
        await worker_engine.close()
