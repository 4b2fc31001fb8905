"""``PgJobListener``: wake idle workers with PostgreSQL ``LISTEN/NOTIFY``.

``SqlJobTransport.enqueue`` sends ``NOTIFY treadle_jobs`` in the enqueueing
transaction, which PostgreSQL delivers on commit. This listener holds one
dedicated psycopg 3 connection in autocommit (outside SQLAlchemy's pool: a
pooled connection would be reset and handed to someone else) that ``LISTEN``s
on the channel and calls every subscriber on each notification. It is the
``WakeSource`` of a PostgreSQL backend: the worker subscribes its ``notify``.

Polling stays the fallback, so the listener is allowed to be wrong in one
direction only: it may wake a worker for nothing, never be the only path to a
job. When the connection drops it reconnects with capped exponential backoff,
and after every (re)connect it wakes the subscribers once, because
notifications sent while it was away are lost. An idle connection is probed
with ``SELECT 1`` every ``health_interval`` seconds, so a silently dead TCP
connection is noticed too.

The connection is opened lazily, by the first ``subscribe``: a process that
only starts runs (a CLI, a Lambda) never holds one.

The payload says what happened: ``run`` (a run was created: claim it), ``jobs``
(jobs were queued: dequeue them), ``end:<id>`` (a run finished that someone marked:
for result waiters and workers waiting for a concurrency slot, see
``adapters/sql/wake_interest.py``) or ``due:<kind>=<time>,...`` (timed work was
written that falls due then: see ``adapters/due_times.py``); subscribers get it as
``kind``.

Every NOTIFY in a database signals every LISTENing backend of it, whatever the channel,
and each runs a transaction to read the queue: this connection costs one transaction
per notification sent by anyone, its own pool's echoes included (dropped below, but
received). That is why the wake-ups that usually have no reader (a run's end, the event
feed) are sent only to those who asked (``wake_interest``). A notification
sent by one of ``own_backends`` (the server pids of this process's own connection
pool, see ``backend_pids``) is dropped: this process's worker was already told
in-process (a finished job or a claim wakes its job loop, a local ``Engine.start``
calls ``notify``, a commit's due times reach the persistence's due watchers), and
waking it again would only cost an empty dequeue or claim transaction per stage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from treadle.adapters.logging import structlog_logger
from treadle.adapters.sql.engine import sync_url
from treadle.adapters.sql.job_transport import NOTIFY_CHANNEL
from treadle.adapters.urls import scrub


def backend_pids(engine: AsyncEngine) -> set[int]:
    """A live set of the server pids of ``engine``'s pooled PostgreSQL connections.

    Kept current by pool events: a pid is added when a connection is first checked out
    and removed when it is closed or invalidated (the OS may reuse it)."""
    pids: set[int] = set()
    sync_engine = engine.sync_engine

    def on_checkout(dbapi_connection: Any, record: Any, *args: Any) -> None:
        # On checkout, not connect: the pool may already hold connections (migrations).
        if "treadle_backend_pid" in record.info:
            return
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        pid = getattr(getattr(driver, "info", None), "backend_pid", None)
        if isinstance(pid, int):
            record.info["treadle_backend_pid"] = pid
            pids.add(pid)

    def on_close(dbapi_connection: Any, record: Any, *args: Any) -> None:
        pids.discard(record.info.pop("treadle_backend_pid", -1))

    event.listen(sync_engine, "checkout", on_checkout)
    for name in ("close", "invalidate", "soft_invalidate"):
        event.listen(sync_engine, name, on_close)
    return pids


def _conninfo(url: str | URL) -> str:
    """A libpq URI for ``url`` (the SQLAlchemy driver suffix removed)."""
    return sync_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PgJobListener:
    """A ``WakeSource`` on ``LISTEN treadle_jobs``; see the module docstring."""

    def __init__(
        self,
        url: str | URL,
        *,
        channel: str = NOTIFY_CHANNEL,
        health_interval: float = 30.0,
        initial_backoff: float = 0.1,
        max_backoff: float = 10.0,
        connect_timeout: float = 5.0,
        own_backends: Collection[int] = (),
        logger: Any = None,
    ) -> None:
        if not channel.isidentifier():
            raise ValueError(f"channel must be a plain identifier, got {channel!r}")
        self._conninfo = _conninfo(url)
        self.channel = channel
        self.health_interval = health_interval
        self.initial_backoff = initial_backoff
        self.max_backoff = max(max_backoff, initial_backoff)
        self.connect_timeout = connect_timeout
        self.own_backends = own_backends
        self.log = logger or structlog_logger("treadle.listener")
        self._subscribers: list[Callable[[str], None]] = []
        self._task: asyncio.Task[None] | None = None
        # Tasks cancelled by the last unsubscribe, their connections still closing:
        # ``aclose`` waits for them, so no session outlives the engine's close.
        self._stopping: set[asyncio.Task[None]] = set()
        self._listening = asyncio.Event()
        self._closed = False
        self.connections = 0
        """Successful (re)connects so far; more than one means the connection dropped."""
        self.notifications = 0
        self.ignored = 0
        """Notifications dropped because this process's own pool sent them."""
        self.backend_pid: int | None = None
        """The server process of the current connection (tests terminate it)."""

    # -- WakeSource -------------------------------------------------------------------
    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        if self._closed:
            raise RuntimeError("PgJobListener is closed")
        self._subscribers.append(callback)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"treadle-listen:{self.channel}"
            )

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)
            if not self._subscribers and self._task is not None:
                task, self._task = self._task, None
                task.cancel()  # its ``finally`` closes the connection
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)

        return unsubscribe

    async def aclose(self) -> None:
        self._closed = True
        self._subscribers.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            self._stopping.add(task)
        if self._stopping:
            await asyncio.wait(list(self._stopping))

    async def __aenter__(self) -> PgJobListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- observability ------------------------------------------------------------------
    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def wait_listening(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a bounded wait for tests and benchmarks
        """Until ``LISTEN`` is in effect (a NOTIFY committed from now on reaches us)."""
        await asyncio.wait_for(self._listening.wait(), timeout)

    # -- the connection loop -----------------------------------------------------------
    def _wake(self, kind: str) -> None:
        for callback in list(self._subscribers):
            try:
                callback(kind)
            except Exception as exc:  # one bad subscriber must not silence the others
                self.log.error("listener.callback_failed", error=repr(exc))

    def _describe(self, exc: BaseException) -> str:
        """``repr(exc)`` for the log, without the URL's credentials should libpq quote any."""
        return scrub(repr(exc), self._conninfo)

    def _delay(self, failures: int) -> float:
        return float(min(self.max_backoff, self.initial_backoff * 2.0 ** min(failures - 1, 32)))

    async def _run(self) -> None:
        import psycopg

        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=max(1, round(self.connect_timeout)),
                )
            except (psycopg.Error, OSError) as exc:
                failures += 1
                delay = self._delay(failures)
                self.log.warning(
                    "listener.connect_failed", error=self._describe(exc), retry_in=delay
                )
                await asyncio.sleep(delay)
                continue
            try:
                await conn.execute(f"LISTEN {self.channel}")
                self.connections += 1
                self.backend_pid = conn.info.backend_pid
                failures = 0
                self._listening.set()
                if self.connections > 1:
                    self.log.info("listener.reconnected", connections=self.connections)
                self._wake("")  # catch up on whatever was enqueued while we were not listening
                while True:
                    async for note in conn.notifies(timeout=self.health_interval):
                        if note.pid in self.own_backends:
                            self.ignored += 1
                            continue
                        self.notifications += 1
                        self._wake(note.payload)
                    await conn.execute("SELECT 1")  # idle: prove the connection is alive
            except (psycopg.Error, OSError) as exc:
                failures += 1
                delay = self._delay(failures)
                self.log.warning(
                    "listener.connection_lost", error=self._describe(exc), retry_in=delay
                )
            finally:
                self._listening.clear()
                self.backend_pid = None
                with contextlib.suppress(Exception):
                    await conn.close()
            await asyncio.sleep(delay)
