"""What the scenario tests that run an in-process worker share: how long they wait for
it, how they start it, and how they poll stored state until a condition holds (the
worker runs concurrently, so a test waits on what it stored, never with a sleep)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

from treadle import Engine, RunStatus
from treadle.kernel import events as ev
from treadle.runtime.worker import Worker

WAIT = 20.0
"""Seconds a test waits for the worker before failing (never a synchronisation sleep)."""


def worker(engine: Engine, concurrency: int = 2) -> Worker:
    """An in-process worker polling every 20 ms, so a test never waits out an interval."""
    return engine.worker(
        concurrency=concurrency, orchestration_interval=0.02, job_poll_interval=0.02
    )


async def until(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll ``condition()`` (plain or async) until true; fails after ``WAIT``."""
    async with asyncio.timeout(WAIT):
        while True:
            held = condition()
            if await held if inspect.isawaitable(held) else held:
                return
            await asyncio.sleep(0.01)  # polling state the worker updates, not waiting for time


async def until_status(engine: Engine, run_id: str, *statuses: RunStatus) -> None:
    """Poll storage until the run reaches one of ``statuses`` (fails after ``WAIT``)."""

    async def reached() -> bool:
        return (await engine.get_run(run_id, with_stages=False)).status in statuses

    await until(reached)


async def run_events(engine: Engine, run_id: str) -> list[ev.EventBase]:
    """The run's stored events, oldest first, as their typed models."""
    return [e async for e in engine.events(run_id)]


async def until_event(engine: Engine, run_id: str, kind: str, count: int = 1) -> ev.EventBase:
    """Poll the outbox until the run has recorded ``count`` events of type ``kind``;
    returns the latest of them."""
    found: list[ev.EventBase] = []

    async def recorded() -> bool:
        found[:] = [e for e in await run_events(engine, run_id) if e.type == kind]  # type: ignore[attr-defined]
        return len(found) >= count

    await until(recorded)
    return found[-1]
