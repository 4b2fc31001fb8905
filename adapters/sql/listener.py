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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL

from treadle.adapters.logging import structlog_logger
from treadle.adapters.sql.engine import sync_url
from treadle.adapters.sql.job_transport import NOTIFY_CHANNEL


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
        self.log = logger or structlog_logger("treadle.listener")
        self._subscribers: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._closed = False
        self.connections = 0
        """Successful (re)connects so far; more than one means the connection dropped."""
        self.notifications = 0
        self.backend_pid: int | None = None
        """The server process of the current connection (tests terminate it)."""

    # -- WakeSource -------------------------------------------------------------------
    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
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
                self._task.cancel()  # its ``finally`` closes the connection
                self._task = None

        return unsubscribe

    async def aclose(self) -> None:
        self._closed = True
        self._subscribers.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    # -- observability ------------------------------------------------------------------
    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def wait_listening(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a bounded wait for tests and benchmarks
        """Until ``LISTEN`` is in effect (a NOTIFY committed from now on reaches us)."""
        await asyncio.wait_for(self._listening.wait(), timeout)

    # -- the connection loop -----------------------------------------------------------
    def _wake(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception as exc:  # one bad subscriber must not silence the others
                self.log.error("listener.callback_failed", error=repr(exc))

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
                self.log.warning("listener.connect_failed", error=repr(exc), retry_in=delay)
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
                self._wake()  # catch up on whatever was enqueued while we were not listening
                while True:
                    async for _ in conn.notifies(timeout=self.health_interval):
                        self.notifications += 1
                        self._wake()
                    await conn.execute("SELECT 1")  # idle: prove the connection is alive
            except (psycopg.Error, OSError) as exc:
                failures += 1
                delay = self._delay(failures)
                self.log.warning("listener.connection_lost", error=repr(exc), retry_in=delay)
            finally:
                self._listening.clear()
                self.backend_pid = None
                with contextlib.suppress(Exception):
                    await conn.close()
            await asyncio.sleep(delay)
