"""The inline SQLite driver (``adapters/sql/sqlite_driver.py``): statements run on the
event loop's thread, and a lock held by another connection is waited for with asyncio
sleeps, never by blocking the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from treadle.adapters.sql import SqlPersistence
from treadle.adapters.sql.sqlite_driver import InlineConnection, is_busy
from treadle.kernel.errors import TransientStorageError
from treadle.kernel.model import Run, RunStatus


def _run(run_id: str) -> Run:
    now = datetime.now(UTC)
    return Run(
        id=run_id, workflow_id="wf", status=RunStatus.PENDING, created_at=now, updated_at=now
    )


def _file(url: str) -> str:
    return str(sa.make_url(url).database)


async def test_statements_run_on_the_loop_thread_without_a_connection_thread(
    sqlite_url: str,
) -> None:
    """No thread per connection, no hand-off per statement: every statement of a write
    and a read transaction executes on the thread running the event loop."""
    before = set(threading.enumerate())
    persistence = await SqlPersistence.open(sqlite_url, migrate=True)
    threads: set[int] = set()

    def on_execute(*args: Any) -> None:
        threads.add(threading.get_ident())

    event.listen(persistence.engine.sync_engine, "before_cursor_execute", on_execute)
    try:
        async with persistence.transaction() as tx:
            await tx.runs.insert(_run("r1"))
            raw = await tx.connection.get_raw_connection()
            assert isinstance(raw.dbapi_connection, InlineConnection)
        async with persistence.transaction(read_only=True) as tx:
            assert await tx.runs.get("r1") is not None
        started = set(threading.enumerate()) - before
    finally:
        await persistence.aclose()
    assert threads == {threading.get_ident()}
    assert not started


async def test_a_writer_waits_for_another_connections_lock_without_blocking_the_loop(
    sqlite_url: str,
) -> None:
    """Another connection (another process, as far as SQLite knows) holds the write lock:
    a write transaction waits for it while the event loop runs other tasks (this test's
    own coroutine releases the lock), then commits. A read-only transaction on the same
    pooled connection before it leaves no trace: the write still begins IMMEDIATE (a
    DEFERRED one would fail on its first write instead of waiting)."""
    persistence = await SqlPersistence.open(sqlite_url, migrate=True)
    async with persistence.transaction(read_only=True) as tx:
        assert await tx.runs.get("after-the-lock") is None
    tried = asyncio.Event()

    def on_begin(conn: Any) -> None:
        tried.set()

    event.listen(persistence.engine.sync_engine, "begin", on_begin)
    holder = sqlite3.connect(_file(sqlite_url), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")

        async def write() -> None:
            async with persistence.transaction() as tx:
                await tx.runs.insert(_run("after-the-lock"))

        writer = asyncio.create_task(write())
        await tried.wait()  # the writer is beginning; the loop runs while it waits
        for _ in range(10):
            await asyncio.sleep(0)
        assert not writer.done()
        holder.execute("COMMIT")
        await writer
        async with persistence.transaction(read_only=True) as tx:
            assert await tx.runs.get("after-the-lock") is not None
    finally:
        holder.close()
        await persistence.aclose()


async def test_a_lock_held_past_the_busy_timeout_is_a_transient_error(sqlite_url: str) -> None:
    """The busy timeout still bounds the wait: past it the write fails with the
    retryable ``TransientStorageError`` ("database is locked"), as before."""
    persistence = await SqlPersistence.open(sqlite_url, migrate=True, busy_timeout_ms=50)
    holder = sqlite3.connect(_file(sqlite_url), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(TransientStorageError, match="locked"):
            async with persistence.transaction() as tx:
                await tx.runs.insert(_run("never"))
        holder.execute("ROLLBACK")
        async with persistence.transaction() as tx:  # the lock gone, writing works again
            await tx.runs.insert(_run("later"))
    finally:
        holder.close()
        await persistence.aclose()


async def test_readers_keep_reading_while_another_connection_writes(sqlite_url: str) -> None:
    """WAL: a read-only transaction needs no lock another connection's write holds."""
    persistence = await SqlPersistence.open(sqlite_url, migrate=True, busy_timeout_ms=50)
    holder = sqlite3.connect(_file(sqlite_url), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("DELETE FROM runs")
        async with persistence.transaction(read_only=True) as tx:
            assert await tx.runs.get("r1") is None
    finally:
        holder.close()
        await persistence.aclose()


async def test_each_transaction_gives_other_ready_tasks_a_turn(sqlite_url: str) -> None:
    """Statements never wait, yet a transaction starts with one turn of the event loop:
    a task running transactions back to back cannot starve a job's heartbeat (a worker
    whose loop is held past the stale-lease threshold has its own jobs reaped)."""
    persistence = await SqlPersistence.open(sqlite_url, migrate=True)
    order: list[str] = []

    async def writer() -> None:
        for i in range(3):
            async with persistence.transaction() as tx:
                await tx.runs.insert(_run(f"r{i}"))
            order.append(f"commit {i}")

    async def other() -> None:
        order.append("other")

    try:
        first = asyncio.create_task(writer())
        second = asyncio.create_task(other())
        await asyncio.gather(first, second)
    finally:
        await persistence.aclose()
    assert order.index("other") < order.index("commit 0")


def test_only_a_busy_error_that_waiting_can_cure_is_retried() -> None:
    """``SQLITE_BUSY`` and its extended codes are waited on; a stale snapshot
    (``SQLITE_BUSY_SNAPSHOT``, which only a new transaction cures) and other errors
    are not."""

    def error(code: int) -> sqlite3.OperationalError:
        exc = sqlite3.OperationalError("database is locked")
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        return exc

    assert is_busy(error(5))
    assert is_busy(error(261))  # SQLITE_BUSY_RECOVERY
    assert not is_busy(error(517))  # SQLITE_BUSY_SNAPSHOT
    assert not is_busy(error(1))
    assert not is_busy(ValueError("database is locked"))
