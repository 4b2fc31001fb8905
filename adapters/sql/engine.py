"""Database URLs and engines: one place that knows the two dialects' quirks.

Users write ``sqlite:///treadle.db`` or ``postgresql://user@host/db``; the async
adapters need an asyncio driver (aiosqlite, psycopg 3) and Alembic needs a sync
one, so both are derived here from whatever the user typed.

SQLite gets the settings that let a worker and a CLI process share one file:
WAL (readers never block the writer), a busy timeout (a second writer waits
instead of failing), and ``BEGIN IMMEDIATE`` for write transactions, which takes
the write lock up front. Without it a transaction that reads first and writes
later can hit ``SQLITE_BUSY`` on the upgrade, which the busy timeout cannot retry.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

DEFAULT_BUSY_TIMEOUT_MS = 10_000
NOTIFY_CHANNEL = "treadle_jobs"
"""PostgreSQL channel notified (on commit) when a run is created or jobs are enqueued."""
READ_ONLY_OPTION = "treadle_read_only"
"""Execution option: begin this SQLite transaction DEFERRED (no write lock)."""

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg"}
_SYNC_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}


def _parse(url: str | URL) -> URL:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgres":  # the libpq spelling
        parsed = parsed.set(drivername="postgresql")
        backend = "postgresql"
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(
            f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
            "use sqlite:///path.db or postgresql://user@host/db"
        )
    return parsed


def async_url(url: str | URL) -> URL:
    """The URL with the asyncio driver the adapters use (aiosqlite or psycopg 3)."""
    parsed = _parse(url)
    return parsed.set(drivername=_ASYNC_DRIVERS[parsed.get_backend_name()])


def sync_url(url: str | URL) -> URL:
    """The URL with a blocking driver, for Alembic and administrative scripts."""
    parsed = _parse(url)
    return parsed.set(drivername=_SYNC_DRIVERS[parsed.get_backend_name()])


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """An ``AsyncEngine`` for ``url``, configured for Treadle's access pattern."""
    target = async_url(url)
    options: dict[str, Any] = {"pool_pre_ping": True}
    if target.get_backend_name() == "sqlite":
        busy_ms = int(kwargs.pop("busy_timeout_ms", DEFAULT_BUSY_TIMEOUT_MS))
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("timeout", busy_ms / 1000)
        options["connect_args"] = connect_args
        options.update(kwargs)
        engine = create_async_engine(target, **options)
        configure_sqlite(engine, busy_timeout_ms=busy_ms)
        return engine
    options.update(kwargs)
    return create_async_engine(target, **options)


def configure_sqlite(
    engine: AsyncEngine, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
) -> None:
    """Install the WAL / busy-timeout / ``BEGIN IMMEDIATE`` hooks on a SQLite engine.

    Idempotent, so an engine passed in by the caller can be configured safely.
    """
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_treadle_sqlite_configured", False):
        return

    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Take transaction control away from the sqlite3 module; on_begin emits BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    def on_begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get(READ_ONLY_OPTION):
            conn.exec_driver_sql("BEGIN DEFERRED")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(sync_engine, "connect", on_connect)
    event.listen(sync_engine, "begin", on_begin)
    sync_engine._treadle_sqlite_configured = True  # type: ignore[attr-defined]
