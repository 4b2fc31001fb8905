"""``RunHandle.result`` waiters woken when their run ends, instead of polling storage.

A waiter registers a future for its run id; the persistence adapter tells
``RunWaiters.ended`` after each commit that finished runs in this process
(``watch_run_ends``), and on PostgreSQL the listener delivers ``end:<ids>``
notifications from other processes. A wake-up from another process is a hint: the
waiter re-reads the run. A run that ended in this process comes with its outcome, the
run as the ending commit wrote it, which ``outcome`` hands to the waiter instead of a
read. Polling with a capped backoff stays as the fallback (a SQLite run finished by
another process, a lost notification).

On PostgreSQL a run's end is NOTIFYed only for runs somebody marked (every NOTIFY costs
each LISTENing backend of the database a transaction; see
``adapters/sql/wake_interest.py``). So a waiter that reads the run, because it may end
in another process, marks it first (``before_read``): the mark commits under a share
lock of the run's row, which makes it race-free against the ending commit. A run
started here for this process's worker needs no mark: its end is told in-process.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from treadle.adapters.run_ends import ended_run_ids
from treadle.kernel.model import Run
from treadle.ports.wake_source import WakeSource

MARK_RENEW = 1800.0
"""Seconds after which a waiter still waiting marks its run again (the mark lasts
``RUN_END_MARK_TTL``, an hour)."""

EXPECTED_LIMIT = 10_000
"""The most runs started here whose end ``RunWaiters`` keeps an eye on (the oldest are
forgotten: their ``result`` then reads the run, as for any other)."""


class RunWaiters:
    """Futures of the ``result`` calls waiting in this process, by run id."""

    def __init__(self, persistence: Any, wake_source: WakeSource | None) -> None:
        self._persistence = persistence
        self._wake_source = wake_source
        self._futures: dict[str, set[asyncio.Future[None]]] = {}
        self._stops: list[Callable[[], None]] | None = None
        self._expected: OrderedDict[str, Run | None] = OrderedDict()
        """Runs started here for a worker of this process (``expect``): ``None`` until
        they end here, then their outcome, until ``outcome`` takes it."""
        self._marked: OrderedDict[str, float] = OrderedDict()
        """Runs this process marked for their end's NOTIFY, with when (monotonic)."""

    def expect(self, run_id: str) -> None:
        """Keep the outcome of ``run_id`` when it ends in this process, for ``outcome``:
        its ``result`` then needs no read at all."""
        if self._stops is None:
            self._attach()
        self._expected[run_id] = None
        if len(self._expected) > EXPECTED_LIMIT:
            self._expected.popitem(last=False)

    def expecting(self, run_id: str) -> bool:
        """Whether ``run_id`` was started here and has not ended here yet."""
        return run_id in self._expected and self._expected[run_id] is None

    def forget_expected(self, run_id: str) -> None:
        """Stop expecting ``run_id`` to end here (its waiter reads the run from now on:
        the worker may have stopped, and another process finish the run)."""
        if self._expected.get(run_id, 0) is None:
            del self._expected[run_id]

    def outcome(self, run_id: str) -> Run | None:
        """The run as the commit that ended it here wrote it (no stages), once; or
        ``None``."""
        if self._expected.get(run_id) is None:
            return None
        return self._expected.pop(run_id)

    async def before_read(self, run_id: str) -> None:
        """Mark ``run_id`` for its end's NOTIFY (PostgreSQL) before a waiter reads it:
        an end committed by another process after that read then wakes the waiter.
        Once per run, renewed after ``MARK_RENEW`` seconds or after a wake-up (the end
        removed the mark; a cancelled run still compensating needs a new one)."""
        mark = getattr(self._persistence, "mark_run_end", None)
        if mark is None or self._wake_source is None:
            return  # no cross-process NOTIFY here: the fallback poll finds other ends
        marked = self._marked.get(run_id)
        now = time.monotonic()
        if marked is not None and now - marked < MARK_RENEW:
            return
        await mark(run_id)
        self._marked[run_id] = now
        self._marked.move_to_end(run_id)
        if len(self._marked) > EXPECTED_LIMIT:
            self._marked.popitem(last=False)

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

    def ended(self, run_ids: Sequence[str], outcomes: Mapping[str, Run] | None = None) -> None:
        """Wake the waiters of ``run_ids`` (called after the commit that ended them), and
        keep the ``outcomes`` of the runs started here."""
        if outcomes:
            expected = self._expected
            for run_id, run in outcomes.items():
                if run_id in expected:
                    expected[run_id] = run
        for run_id in run_ids:
            self._marked.pop(run_id, None)  # the ending commit's trigger removed the mark
            for future in self._futures.pop(run_id, ()):
                if not future.done():
                    future.set_result(None)

    async def aclose(self) -> None:
        """Stop listening; wake every waiter so it re-reads (and sees the engine closed)."""
        for stop in self._stops or ():
            stop()
        self._stops = []
        self._expected.clear()
        self.ended(list(self._futures))

    async def __aenter__(self) -> RunWaiters:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

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
