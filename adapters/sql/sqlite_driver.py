"""SQLite on the event loop's thread: an asyncio driver for SQLAlchemy without a thread
hop per statement (URL scheme ``sqlite+treadle``, what ``sqlite:///`` URLs now use).

aiosqlite runs each call on its connection's own thread: opening a cursor, executing,
fetching and closing are four hand-offs per statement, each a queue put, a wake-up of
the event loop through its self-pipe and two GIL hand-overs. SQLite itself executes a
Treadle statement in microseconds (WAL, ``synchronous = NORMAL``: a commit writes the
WAL and does not wait for the disk), so a one-run-at-a-time pipeline spent most of its
CPU on the hand-offs. Here every statement runs synchronously where it is called, on
the loop's thread; where SQLAlchemy's async layer still wraps a call (``BEGIN``,
``COMMIT``, a connection's checkout, statements outside ``SqlTransaction``) it awaits
a coroutine that suspends only to wait for a lock.

The one thing that could block the loop is a lock another connection holds: another
process's write transaction (``BEGIN IMMEDIATE`` waits for it) or, rarely, a WAL
recovery. So SQLite's own busy timeout stays at zero on these connections: a statement
that finds the database locked fails at once with ``SQLITE_BUSY`` having done nothing,
and is tried again after an ``asyncio.sleep`` (the busy handler's own schedule, 1, 2,
5 ... 100 ms) until the configured busy timeout has passed; the loop runs every other
task meanwhile. The waits happen where a transaction takes its locks: ``BEGIN
IMMEDIATE`` (the write lock), a deferred transaction's first read, made at once after
its ``BEGIN`` (the read snapshot), ``COMMIT``, and statements outside a transaction. In
WAL mode nothing else waits for another connection; a ``SQLITE_BUSY`` anywhere else (a
stale snapshot, which only a new transaction cures) is raised at once, as SQLite
raises it.

Inside a transaction SQLAlchemy's async layer is skipped too: ``SqlTransaction.execute``
calls the sync connection (``SqlDialect.inline``), which saves a greenlet, a coroutine
and their switches per statement, more than SQLAlchemy's own work for the statement.

Rows are fetched when the statement runs (as SQLAlchemy's aiosqlite adapter does), so
no statement stays open to hold a read snapshot past its result.
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import pool
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine.url import URL
from sqlalchemy.util.concurrency import await_, in_greenlet

DRIVER = "treadle"
"""The driver's name in URLs: ``sqlite+treadle:///path.db``."""
READ_ONLY_OPTION = "treadle_read_only"
"""Execution option: begin this SQLite transaction DEFERRED (no write lock)."""

SQLITE_BUSY = 5
SQLITE_BUSY_SNAPSHOT = 517
"""A read transaction's snapshot is too old to write: retrying cannot help."""

BUSY_DELAYS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05, 0.1)
"""Seconds between attempts on a locked database: SQLite's busy handler's schedule."""

SNAPSHOT = "SELECT 1 FROM sqlite_master LIMIT 1"
"""A read of the database file: a deferred transaction's first, which takes its snapshot."""

DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds, as ``sqlite3.connect``'s ``timeout`` default (``create_engine`` sets 10)."""


def is_busy(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``SQLITE_BUSY`` that waiting may cure."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # sqlite3 before Python 3.11 gave no code: the message says it
        return isinstance(exc, sqlite3.OperationalError) and "database is locked" in str(exc)
    return isinstance(code, int) and code & 0xFF == SQLITE_BUSY and code != SQLITE_BUSY_SNAPSHOT


def _opens_or_ends(operation: str) -> bool:
    """``BEGIN ...`` or ``COMMIT``/``END``: statements SQLite's busy handler retries."""
    head = operation.lstrip()[:6].upper()
    return head.startswith(("BEGIN", "COMMIT", "END"))


class InlineCursor:
    """A DBAPI cursor whose statements run on the calling thread, rows fetched at once."""

    __slots__ = ("_connection", "_cursor", "_rows", "description", "lastrowid", "rowcount")

    arraysize = 1
    server_side = False

    def __init__(self, connection: InlineConnection) -> None:
        self._connection = connection
        self._cursor = connection.driver_connection.cursor()
        self._rows: collections.deque[Any] = collections.deque()
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    def execute(self, operation: str, parameters: Any = None) -> InlineCursor:
        cursor = self._cursor
        if parameters is None:
            self._connection.run(operation, cursor.execute, operation)
        else:
            self._connection.run(operation, cursor.execute, operation, parameters)
        self._settle(cursor)
        return self

    def executemany(self, operation: str, seq_of_parameters: Any) -> InlineCursor:
        cursor = self._cursor
        self._connection.run(operation, cursor.executemany, operation, seq_of_parameters)
        self._settle(cursor)
        return self

    def _settle(self, cursor: sqlite3.Cursor) -> None:
        self.description = cursor.description
        self.lastrowid = cursor.lastrowid
        if self.description is not None:
            self._rows = collections.deque(cursor.fetchall())
        self.rowcount = cursor.rowcount

    def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        rows = self._rows
        return [rows.popleft() for _ in range(min(size or self.arraysize, len(rows)))]

    def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def __iter__(self) -> Any:
        while self._rows:
            yield self._rows.popleft()

    def setinputsizes(self, *sizes: Any) -> None:
        pass

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        pass

    async def _async_soft_close(self) -> None:
        """What SQLAlchemy's async layer calls after a buffered execute: the rows are
        fetched already, so nothing is left to release."""

    def close(self) -> None:
        self._rows.clear()
        self._cursor.close()


class InlineConnection:
    """A ``sqlite3`` connection whose statements run on the calling (loop) thread, with
    waits for a locked database done as asyncio sleeps (see the module docstring)."""

    __slots__ = ("_connection", "begin_default", "begin_with", "busy_timeout")

    def __init__(self, connection: sqlite3.Connection, busy_timeout: float) -> None:
        self._connection = connection
        self.busy_timeout = busy_timeout
        """Seconds a statement may wait for a lock held by another connection."""
        self.begin_default: str | None = None
        """How a transaction SQLAlchemy begins starts: ``BEGIN IMMEDIATE`` once
        ``engine.configure_sqlite`` set ``IMMEDIATE``; ``None``, nothing is sent (the
        ``sqlite3`` module's own implicit ``BEGIN``, pysqlite's behaviour)."""
        self.begin_with: str | None = None
        """How the next transaction starts instead of ``begin_default``, once (``DEFERRED``
        for a connection given the ``READ_ONLY_OPTION`` execution option)."""

    @property
    def driver_connection(self) -> sqlite3.Connection:
        """The ``sqlite3`` connection itself."""
        return self._connection

    def run(self, operation: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, executing ``operation``, now; retried while the database is
        locked where SQLite's busy handler would retry it: a statement outside a
        transaction, ``BEGIN``, ``COMMIT``.

        SQLAlchemy's async engine requires a driver to await something (else it raises
        ``AwaitRequired``): under ``greenlet_spawn`` the statement runs inside an awaited
        coroutine, which suspends only to sleep on a locked database. Outside a greenlet
        (``SqlTransaction.execute`` calls the sync connection for a statement inside a
        transaction: ``begin`` took the lock or snapshot already, and in WAL mode nothing
        after that waits for another connection) the call is made directly."""
        if not in_greenlet():
            return call(*args)
        retry = not self._connection.in_transaction or _opens_or_ends(operation)
        return await_(self._run(operation, call, args, retry))

    async def _run(
        self, operation: str, call: Callable[..., Any], args: Sequence[Any], retry: bool
    ) -> Any:
        if operation.startswith("BEGIN"):
            # One turn of the event loop per transaction: other ready tasks (a job's
            # heartbeat, the maintenance tick) run between transactions, as they did
            # between aiosqlite's hops. Without it a task running transactions back to
            # back, none of which waits for anything, would hold the loop for all of them.
            await asyncio.sleep(0)
        try:
            return call(*args)
        except sqlite3.OperationalError as exc:
            if not (retry and is_busy(exc)):
                raise
            return await self._wait_and_retry(exc, call, args)

    async def _wait_and_retry(
        self, busy: sqlite3.OperationalError, call: Callable[..., Any], args: Sequence[Any]
    ) -> Any:
        """Try ``call`` again after each of SQLite's busy delays until the busy timeout
        has passed; then raise the last ``SQLITE_BUSY`` error."""
        deadline = time.monotonic() + self.busy_timeout
        attempt = 0
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(BUSY_DELAYS[min(attempt, len(BUSY_DELAYS) - 1)], left))
            attempt += 1
            try:
                return call(*args)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                busy = exc
        raise busy

    def begin(self) -> None:
        """``BEGIN <begin_with or begin_default>``, if either is set (see
        ``InlineSqliteDialect.do_begin``). A deferred transaction takes its read snapshot
        here too, where waiting for a lock is possible (SQLite's WAL recovery by another
        connection), so none of its statements has to."""
        mode, self.begin_with = self.begin_with or self.begin_default, None
        if mode is None:
            return
        execute = self._connection.execute
        operation = f"BEGIN {mode}"
        if not in_greenlet():
            execute(operation)
            return
        await_(self._run(operation, execute, (operation,), True))
        if mode == "DEFERRED":
            await_(self._run(SNAPSHOT, execute, (SNAPSHOT,), True))

    def cursor(self, server_side: bool = False) -> InlineCursor:
        return InlineCursor(self)

    def execute(self, operation: str, parameters: Any = None) -> InlineCursor:
        return self.cursor().execute(operation, parameters)

    def commit(self) -> None:
        self.run("COMMIT", self._connection.commit)

    def rollback(self) -> None:
        self.begin_with = None  # a read-only request never outlives its transaction
        self._connection.rollback()

    def close(self) -> None:
        self._connection.close()

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._connection.create_function(*args, **kwargs)

    @property
    def isolation_level(self) -> str | None:
        return self._connection.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self._connection.isolation_level = value

    @property
    def in_transaction(self) -> bool:
        return bool(self._connection.in_transaction)


class InlineDbapi:
    """The DBAPI module SQLAlchemy sees: ``sqlite3``'s names, and a ``connect`` that
    takes SQLite's busy timeout for itself and gives the connection a zero one."""

    paramstyle = "qmark"

    def __init__(self) -> None:
        self.sqlite = sqlite3
        for name in (
            "DatabaseError",
            "Error",
            "IntegrityError",
            "InterfaceError",
            "InternalError",
            "DataError",
            "NotSupportedError",
            "OperationalError",
            "ProgrammingError",
            "Warning",
            "sqlite_version",
            "sqlite_version_info",
            "PARSE_COLNAMES",
            "PARSE_DECLTYPES",
            "Binary",
        ):
            setattr(self, name, getattr(sqlite3, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(sqlite3, name)

    def connect(self, *args: Any, **kwargs: Any) -> InlineConnection:
        busy_timeout = float(kwargs.pop("timeout", DEFAULT_BUSY_TIMEOUT))
        kwargs["timeout"] = 0
        # Pool finalisers may close a connection from another thread; statements only
        # ever run on the thread of the loop that uses the engine.
        kwargs.setdefault("check_same_thread", False)
        return InlineConnection(sqlite3.connect(*args, **kwargs), busy_timeout)


class InlineSqliteDialect(SQLiteDialect_pysqlite):
    """The pysqlite dialect, asynchronous (for ``create_async_engine``) over
    ``InlineConnection``."""

    driver = DRIVER
    is_async = True
    supports_statement_cache = True
    supports_server_side_cursors = False

    @classmethod
    def import_dbapi(cls) -> Any:
        return InlineDbapi()

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        if cls._is_url_file_db(url):
            return pool.AsyncAdaptedQueuePool
        return pool.StaticPool

    def get_driver_connection(self, connection: Any) -> Any:
        return connection.driver_connection

    def do_begin(self, dbapi_connection: Any) -> None:
        """Send the transaction's ``BEGIN`` straight to the driver. A ``begin`` event
        listener sending it with ``exec_driver_sql`` (as for aiosqlite) would cost a
        statement's trip through SQLAlchemy, and having a listener at all makes
        SQLAlchemy dispatch its connection events around every statement."""
        dbapi_connection.begin()

    def set_connection_execution_options(self, connection: Any, opts: Any) -> None:
        """``READ_ONLY_OPTION`` on a connection: its next transaction begins
        ``DEFERRED`` (no write lock)."""
        super().set_connection_execution_options(connection, opts)
        if opts.get(READ_ONLY_OPTION):
            connection.connection.dbapi_connection.begin_with = "DEFERRED"


dialect = InlineSqliteDialect
