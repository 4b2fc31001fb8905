"""``RunHandle.result`` waiters woken when their run ends, instead of polling storage.

A waiter registers a future for its run id; the persistence adapter tells
``RunWaiters.ended`` after each commit that finished runs in this process
(``watch_run_ends``), and on PostgreSQL the listener delivers ``end:<ids>``
notifications from other processes. Whatever wakes a waiter, it re-reads the run: a
wake-up is a hint, never the answer. Polling with a capped backoff stays as the
fallback (a SQLite run finished by another process, a lost notification).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from treadle.adapters.run_ends import ended_run_ids
from treadle.ports.wake_source import WakeSource


class RunWaiters:
    """Futures of the ``result`` calls waiting in this process, by run id."""

    def __init__(self, persistence: Any, wake_source: WakeSource | None) -> None:
        self._persistence = persistence
        self._wake_source = wake_source
        self._futures: dict[str, set[asyncio.Future[None]]] = {}
        self._stops: list[Callable[[], None]] | None = None

    def waiter(self, run_id: str) -> asyncio.Future[None]:
        """A future resolved when ``run_id`` may have ended; ``forget`` it after use."""
        if self._stops is None:
            self._attach()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(run_id, set()).add(future)
        return future

    def forget(self, run_id: str, future: asyncio.Future[None]) -> None:
        waiting = self._futures.get(run_id)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._futures[run_id]

    def ended(self, run_ids: Sequence[str]) -> None:
        """Wake the waiters of ``run_ids`` (called after the commit that ended them)."""
        for run_id in run_ids:
            for future in self._futures.pop(run_id, ()):
                if not future.done():
                    future.set_result(None)

    def close(self) -> None:
        """Stop listening; wake every waiter so it re-reads (and sees the engine closed)."""
        for stop in self._stops or ():
            stop()
        self._stops = []
        self.ended(list(self._futures))

    def _attach(self) -> None:
        """Subscribe on first use: an engine that never waits opens no listener."""
        self._stops = []
        watch = getattr(self._persistence, "watch_run_ends", None)
        if watch is not None:
            self._stops.append(watch(self.ended))
        if self._wake_source is not None:
            self._stops.append(self._wake_source.subscribe(self._on_notification))

    def _on_notification(self, payload: str) -> None:
        ids = ended_run_ids(payload)
        if ids is not None:
            self.ended(ids)
        elif payload == "":  # the listener reconnected: notifications may have been lost
            self.ended(list(self._futures))
