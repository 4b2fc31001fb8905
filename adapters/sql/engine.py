"""Database URLs and engines: one place that knows the two dialects' quirks.

Users write ``sqlite:///treadle.db`` or ``postgresql://user@host/db``; the async
adapters need an asyncio driver (Treadle's own inline SQLite driver,
``sqlite_driver.py``, or psycopg 3) and Alembic needs a sync one, so both are derived
here from whatever the user typed. ``sqlite+aiosqlite://`` written out keeps aiosqlite.

SQLite gets the settings that let a worker and a CLI process share one file:
WAL (readers never block the writer), a busy timeout (a second writer waits
instead of failing), and ``BEGIN IMMEDIATE`` for write transactions, which takes
the write lock up front. Without it a transaction that reads first and writes
later can hit ``SQLITE_BUSY`` on the upgrade, which the busy timeout cannot retry.
"""

from __future__ import annotations

import json
import select
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import registry
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from treadle.adapters.sql.sqlite_driver import DRIVER as SQLITE_DRIVER
from treadle.adapters.sql.sqlite_driver import READ_ONLY_OPTION, InlineConnection
from treadle.adapters.urls import redact_url
from treadle.kernel.limits import MAX_INT, MIN_INT

DEFAULT_BUSY_TIMEOUT_MS = 10_000
NOTIFY_CHANNEL = "treadle_jobs"
"""PostgreSQL channel notified (on commit) when a run is created or jobs are enqueued."""

_ASYNC_DRIVERS = {"sqlite": "sqlite+treadle", "postgresql": "postgresql+psycopg"}
_SYNC_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}
_KEPT_ASYNC_DRIVERS = frozenset({"sqlite+aiosqlite"})
"""Asynchronous drivers a URL may name to be used instead of the default one."""

registry.register("sqlite.treadle", "treadle.adapters.sql.sqlite_driver", "InlineSqliteDialect")


def _parse(url: str | URL) -> URL:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgres":  # the libpq spelling
        parsed = parsed.set(drivername="postgresql")
        backend = "postgresql"
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(
            f"unsupported database URL {redact_url(parsed)!r}: "
            "use sqlite:///path.db or postgresql://user@host/db"
        )
    return parsed


def async_url(url: str | URL) -> URL:
    """The URL with the asyncio driver the adapters use (the inline SQLite driver, or
    aiosqlite if the URL names it; psycopg 3)."""
    parsed = _parse(url)
    if parsed.drivername in _KEPT_ASYNC_DRIVERS:
        return parsed
    return parsed.set(drivername=_ASYNC_DRIVERS[parsed.get_backend_name()])


def sync_url(url: str | URL) -> URL:
    """The URL with a blocking driver, for Alembic and administrative scripts."""
    parsed = _parse(url)
    return parsed.set(drivername=_SYNC_DRIVERS[parsed.get_backend_name()])


def dump_json(value: Any) -> str:
    """JSON text for JSON columns, non-ASCII characters kept as they are: SQLite's JSON
    paths compare object labels as stored, so ``$."café"`` would not find ``"caf\u00e9"``
    (a search attribute key with an accent would never match)."""
    return _JSON.encode(value)


_JSON = json.JSONEncoder(ensure_ascii=False)
"""Made once: ``json.dumps(..., ensure_ascii=False)`` builds an encoder per call."""


def _json_int(text: str) -> int | float:
    """An integer in a JSON column. The kernel stores no integer past 64 bits
    (``kernel.limits``), so a longer one was a float that PostgreSQL's jsonb (numeric)
    printed without its exponent, ``9.3e+18`` as ``9300000000000000000``: it is read
    back as that float, as the memory adapter and SQLite return it."""
    value = int(text)
    return value if MIN_INT <= value <= MAX_INT else float(text)


def load_json(data: bytes | str) -> Any:
    """A JSON column's value from its text. ``null`` (what a JSON column holds for
    ``None``: most of a stage row's JSON columns, most of the time) is recognised
    without the parser, and bytes are decoded first, which spares ``json.loads`` its
    encoding detection: together most of the decoding cost of reading a row."""
    if data == b"null" or data == "null":
        return None
    return json.loads(data.decode() if isinstance(data, bytes) else data, parse_int=_json_int)


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """An ``AsyncEngine`` for ``url``, configured for Treadle's access pattern."""
    target = async_url(url)
    options: dict[str, Any] = {
        "pool_pre_ping": True,
        "json_serializer": dump_json,
        "json_deserializer": load_json,
    }
    if target.get_backend_name() == "sqlite":
        busy_ms = int(kwargs.pop("busy_timeout_ms", DEFAULT_BUSY_TIMEOUT_MS))
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("timeout", busy_ms / 1000)
        options["connect_args"] = connect_args
        if target.get_driver_name() == SQLITE_DRIVER:
            # A connection to a local file cannot be lost as a network one can; the
            # pre-ping would run ``SELECT 1`` on every checkout, one per transaction.
            options["pool_pre_ping"] = False
        options.update(kwargs)
        engine = create_async_engine(target, **options)
        configure_sqlite(engine, busy_timeout_ms=busy_ms)
        return engine
    # Liveness is checked on checkout without a round trip (see configure_postgres):
    # SQLAlchemy's pre-ping would add a query, and a server transaction, per checkout.
    checked = "pool_pre_ping" not in kwargs
    options["pool_pre_ping"] = False
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args["options"] = f"{connect_args.get('options', '')} {SESSION_OPTIONS}".strip()
    options["connect_args"] = connect_args
    options.update(kwargs)
    engine = create_async_engine(target, **options)
    if checked:
        configure_postgres(engine)
    return engine


SESSION_OPTIONS = "-c plan_cache_mode=force_custom_plan -c TimeZone=UTC"
"""Server settings of every connection ``create_engine`` opens to PostgreSQL (libpq
``options``, no extra round trip).

``TimeZone=UTC``: timestamps come back in UTC already (psycopg gives them
``datetime.UTC``), so reading a row converts none of them; the values are the same
instants whatever the server's default zone.

``plan_cache_mode=force_custom_plan``: psycopg prepares a statement it has run five times,
and the server may then switch it to a generic plan made from the statistics of that
moment; the set-oriented writes (``pg_bulk.py``) join a ``jsonb_to_recordset`` of any
size to the table, and a generic plan chosen while the table was tiny keeps scanning it
whole after it has grown (measured: 20-40 ms instead of 3-5 ms per 32-row update on
50,000 stages, until autovacuum's next ANALYZE). Planning each execution for its own
parameters costs the server tens of microseconds per statement; a group commit runs
about ten statements for tens of stages. It also makes the server plan again the query
of every foreign key check (one per stage row inserted), which a large
``insert_stages`` avoids by switching to ``auto`` around its statement."""

IDLE_PING_AFTER = 1.0
"""Seconds a pooled PostgreSQL connection may sit idle before checkout pings it."""


def _socket_closed(dbapi_connection: Any) -> bool:
    """Whether an idle pooled psycopg connection was closed by the server: the socket of
    an idle connection is readable only when the server sent something unasked, which
    for a pooled connection (no LISTEN) means a FATAL error before closing it."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    pgconn = getattr(driver, "pgconn", None)
    if pgconn is None:
        return False
    from psycopg import pq

    if pgconn.status != pq.ConnStatus.OK:
        return True
    try:
        fd = pgconn.socket
    except Exception:  # the connection is closed: psycopg refuses to give a socket
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


def configure_postgres(engine: AsyncEngine, *, idle_ping_after: float = IDLE_PING_AFTER) -> None:
    """A cheap stand-in for ``pool_pre_ping`` on a PostgreSQL engine.

    On checkout, a connection whose socket shows the server closed it is discarded
    (``DisconnectionError`` makes the pool connect afresh), with no round trip; one
    idle for more than ``idle_ping_after`` seconds is also pinged, so a connection
    lost silently (a network cut, no FATAL message) is caught too. Busy workers
    reuse connections within milliseconds and never pay for the ping.
    """
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_treadle_pg_configured", False):
        return
    dialect = sync_engine.dialect

    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        record.info["treadle_idle_since"] = time.monotonic()

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop("treadle_idle_since", None)
        if since is None:  # a new connection
            return
        if _socket_closed(dbapi_connection):
            raise sa_exc.DisconnectionError("connection closed by the server while pooled")
        if time.monotonic() - since > idle_ping_after:
            try:
                dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise sa_exc.DisconnectionError(f"ping failed: {exc}") from exc

    event.listen(sync_engine, "checkin", on_checkin)
    event.listen(sync_engine, "checkout", on_checkout)
    sync_engine._treadle_pg_configured = True  # type: ignore[attr-defined]


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
            if isinstance(dbapi_connection, InlineConnection):
                # Its statements run on the loop's thread: SQLite's busy handler would
                # sleep there, so the driver waits for locks itself (asyncio sleeps).
                dbapi_connection.busy_timeout = busy_timeout_ms / 1000
                # Its dialect sends BEGIN itself: no ``begin`` listener (see do_begin).
                dbapi_connection.begin_default = "IMMEDIATE"
            else:
                cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    def on_begin(conn: sa.Connection) -> None:
        mode = "DEFERRED" if conn.get_execution_options().get(READ_ONLY_OPTION) else "IMMEDIATE"
        conn.exec_driver_sql(f"BEGIN {mode}")

    event.listen(sync_engine, "connect", on_connect)
    if sync_engine.dialect.driver != SQLITE_DRIVER:
        event.listen(sync_engine, "begin", on_begin)
    sync_engine._treadle_sqlite_configured = True  # type: ignore[attr-defined]
