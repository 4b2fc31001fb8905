"""SQLite: concurrent write transactions of one process queue in-process, not in SQLite's
sleeping busy handler, and none fails with "database is locked"."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

from treadle.adapters.sql import SqlPersistence
from treadle.kernel.model import Run, RunFilter, RunStatus


async def test_concurrent_writers_in_one_process_all_commit(sqlite_url: str) -> None:
    """Twenty writers that each yield to the loop mid-transaction all commit, one at a
    time (never two inside a write transaction at once)."""
    persistence = await SqlPersistence.open(sqlite_url, migrate=True)
    inside = 0
    most = 0

    async def writer(i: int) -> None:
        nonlocal inside, most
        now = datetime.now(UTC)
        async with persistence.transaction() as tx:
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0)  # let every other writer try to get in
            await tx.runs.insert(
                Run(
                    id=f"r{i}",
                    workflow_id="wf",
                    status=RunStatus.PENDING,
                    created_at=now,
                    updated_at=now,
                )
            )
            inside -= 1

    try:
        await asyncio.gather(*(writer(i) for i in range(20)))
        async with persistence.transaction(read_only=True) as tx:
            assert len(await tx.runs.query(RunFilter(limit=50))) == 20
    finally:
        await persistence.aclose()
    assert most == 1


async def test_a_writer_cancelled_while_queued_for_the_write_gate_stops(sqlite_url: str) -> None:
    """A write transaction cancelled while it waits for the in-process write gate stops,
    even when the cancellation arrives as the gate is granted (Python 3.11's ``wait_for``
    swallowed it there, and a cancelled job heartbeat ran on forever)."""
    before = set(threading.enumerate())
    persistence = await SqlPersistence.open(sqlite_url, migrate=True)

    async def writer() -> None:
        while True:
            async with persistence.connect():
                await asyncio.sleep(0)

    try:
        for attempt in range(150):
            tasks = [asyncio.create_task(writer()) for _ in range(3)]
            for _ in range(attempt % 9):  # cancel at every phase of the hand-over
                await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=5)
            assert not pending, "a cancelled writer kept running"
    finally:
        await persistence.aclose()
        running = await _join_connection_threads(before)
    assert not running, f"aiosqlite threads outlived the engine: {running}"


async def _join_connection_threads(before: set[threading.Thread]) -> list[str]:
    """Wait (5 s at most) for the aiosqlite connection threads started since ``before``;
    the names of those still running.

    A writer cancelled while the pool opens its connection leaves that connection's
    thread to finish opening and closing it (aiosqlite stops it without waiting), and
    the pool never sees the connection, so ``close()`` cannot wait for it. The thread
    ends by handing its results to this loop: it must do so before the loop closes, or
    it raises "Event loop is closed" into whichever test runs then."""
    threads = [
        t
        for t in threading.enumerate()
        if t not in before and t.name.endswith("(_connection_worker_thread)")
    ]
    for thread in threads:
        await asyncio.to_thread(thread.join, 5.0)
    return [t.name for t in threads if t.is_alive()]
