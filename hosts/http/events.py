"""``EventHub``: one shared reader of the event feed per app, fanning events out to the
SSE streams of ``/api/v1/runs/{id}/events`` and ``/api/v1/events``.

However many clients stream, the app reads new events once: the hub follows the outbox
(``Engine.event_feed``, cursor = outbox row id) and hands each event to the subscribers
whose filter it passes. What wakes the hub:

- **PostgreSQL**: ``LISTEN treadle_events`` on one dedicated connection, plus this
  process's own commits told in-process. Commits send ``NOTIFY treadle_events`` only
  while a live reader is announced (each NOTIFY costs every LISTENing backend of the
  database a transaction; see ``adapters/sql/wake_interest.py``): the hub announces
  itself before its first stream subscribes, renews the announcement every
  ``READER_TTL / 3`` seconds while it has streams, and withdraws it when the last one
  goes. A commit whose statement began before the announcement cannot see it, so the
  hub reads once more ``ANNOUNCE_SETTLE`` seconds after announcing. A slow safety read
  every ``FALLBACK_POLL_PG`` seconds covers a notification lost while the listener
  reconnects.
- **SQLite**: this process's commits are told in-process; commits of *other* processes
  (a separate ``treadle worker``) are found by one shared read every
  ``POLL_SQLITE`` seconds (SQLite has no cross-process notification).
- **memory**: only this process can write, so in-process notification is complete.

On PostgreSQL outbox ids are taken before commit, so a transaction can commit row 11
while row 10 is still in flight. The hub delivers in id order and holds back rows after
a gap until it fills, or for at most ``GAP_WAIT`` seconds (a rolled-back transaction
leaves a permanent gap). A transaction that commits its events more than ``GAP_WAIT``
seconds after a later one did is the one case the all-runs stream can miss; one run's
stream cannot miss it (it reads that run's gap-free sequence, see ``api/stream``).

A subscriber that falls more than ``QUEUE_SIZE`` events behind is dropped (its stream
ends); an ``EventSource`` reconnects with ``Last-Event-ID`` and catches up from the
database, so a slow client costs memory up to that bound and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from treadle.adapters.logging import structlog_logger

if TYPE_CHECKING:
    from treadle.engine import Engine
    from treadle.kernel.events import EventBase

__all__ = ["EventHub", "Subscription"]

QUEUE_SIZE: Final = 10_000
GAP_WAIT: Final = 2.0
FALLBACK_POLL_PG: Final = 5.0
POLL_SQLITE: Final = 0.25
READ_BATCH: Final = 1_000
READER_TTL: Final = 60.0
"""Seconds an announcement of this hub as a live reader lasts (renewed every third)."""

WITHDRAW_TIMEOUT = 2.0
"""Seconds ``aclose`` waits for the announcement's withdrawal before leaving it to
expire."""
ANNOUNCE_SETTLE: Final = 1.0
"""Seconds after an announcement when the hub reads once more, for the commits whose
statement began before it (and so sent no NOTIFY)."""

EventFilter = Callable[[int, "EventBase", "str | None"], bool]
"""``filter(outbox_id, event, workflow_id)``: whether a subscriber wants the event."""


@dataclass(eq=False)
class Subscription:
    """One stream's view of the hub: ``queue`` holds ``(outbox_id, event)`` pairs; a
    ``None`` item means the stream must end (dropped as too slow, or the hub closed)."""

    wants: EventFilter
    needs_workflow: bool = False
    """The filter looks at the workflow id: the hub resolves it for every event."""
    queue: asyncio.Queue[tuple[int, EventBase] | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_SIZE)
    )
    dropped: bool = False


class EventHub:
    """The app's shared event reader (started by the first ``subscribe``)."""

    def __init__(
        self,
        engine: Engine,
        *,
        poll_interval: float | None = None,
        gap_wait: float | None = None,
    ) -> None:
        self.engine = engine
        kind = engine.backend.kind if engine.backend is not None else "memory"
        self.kind = kind
        default_poll = {"postgresql": FALLBACK_POLL_PG, "sqlite": POLL_SQLITE}.get(kind)
        self.poll_interval = poll_interval if poll_interval is not None else default_poll
        self.gap_wait = (
            gap_wait if gap_wait is not None else (GAP_WAIT if kind == "postgresql" else 0.0)
        )
        self.cursor = 0
        """The highest outbox id handed to subscribers (or skipped as a gap)."""
        self._subscribers: set[Subscription] = set()
        self._subscribed = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._stops: list[Callable[[], None]] = []
        self._listener: Any = None
        self._workflows: dict[str, str] = {}
        self._gap_since: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reader_id = f"hub-{uuid.uuid4().hex}"
        """This hub's row in ``event_readers`` (PostgreSQL)."""
        self._announced_at: float | None = None
        """When (monotonic) the hub last announced itself as a live reader."""
        self._announcing = asyncio.Lock()
        self._joining = 0
        """Subscriptions in progress (``subscribe`` between its announcement and its
        subscription's registration)."""
        self.log = structlog_logger("treadle.http.events")

    # -- subscribing ------------------------------------------------------------------
    async def subscribe(
        self, wants: EventFilter, *, needs_workflow: bool = False
    ) -> tuple[Subscription, int]:
        """A new subscription and the hub's cursor at that moment: the subscription gets
        every wanted event with an outbox id above it; read older ones from the
        database (``Engine.event_feed`` / ``Engine.events``)."""
        # Counted from before the announcement until the subscription is in: the reader
        # loop, seeing no stream yet, must not withdraw the announcement meanwhile.
        self._joining += 1
        try:
            await self._ensure_started()
            await self._announce()  # before the cursor: later commits notify
            if not self._subscribers:
                # The hub reads nothing while nobody listens: catch its cursor up first.
                self.cursor = max(self.cursor, await self.engine.outbox.last_id())
            subscription = Subscription(wants, needs_workflow=needs_workflow)
            self._subscribers.add(subscription)  # no await between these two lines
            self._subscribed.set()
        finally:
            self._joining -= 1
        return subscription, self.cursor

    async def wait_for_subscriber(self) -> None:
        """Return once a stream subscribes (tests and benchmarks: "the client listens")."""
        while not self._subscribers:
            self._subscribed.clear()
            await self._subscribed.wait()

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def _is_started(self) -> bool:
        return self._task is not None

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def poke(self, _kind: str = "") -> None:
        """Something may have been appended: read the feed soon. Safe from any thread."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    # -- lifecycle --------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        if self._is_started():
            return
        async with self._start_lock:
            if self._is_started():  # another stream started it while this one waited
                return
            self._loop = asyncio.get_running_loop()
            self.cursor = await self.engine.outbox.last_id()
            persistence = self.engine.kernel.deps.persistence
            watch = getattr(persistence, "watch_events", None)
            if callable(watch):
                self._stops.append(watch(self.poke))
            backend = self.engine.backend
            if backend is not None and backend.kind == "postgresql":
                from treadle.adapters.event_feed import EVENTS_CHANNEL
                from treadle.adapters.sql.listener import PgJobListener

                self._listener = PgJobListener(backend.url, channel=EVENTS_CHANNEL)
                self._stops.append(self._listener.subscribe(self.poke))
            self._task = asyncio.create_task(self._run(), name="treadle-http-event-hub")

    # -- the announcement (PostgreSQL) -------------------------------------------------
    def _announces(self) -> bool:
        return self.kind == "postgresql" and callable(
            getattr(self.engine.kernel.deps.persistence, "announce_event_reader", None)
        )

    async def _announce(self, *, renew: bool = False) -> None:
        """Announce this hub as a live reader for ``READER_TTL`` seconds (with ``renew``,
        even if it already is). A failure is logged, not raised: the safety poll still
        delivers, and the reader loop tries again."""
        if not self._announces():
            return
        async with self._announcing:  # announce and withdraw never interleave
            first = self._announced_at is None
            if not (first or renew):
                return
            try:
                persistence: Any = self.engine.kernel.deps.persistence
                await persistence.announce_event_reader(self.reader_id, READER_TTL)
            except Exception as exc:
                self.log.warning("events.announce_failed", error=repr(exc))
                return
            self._announced_at = time.monotonic()
        if first and self._loop is not None:
            self._loop.call_later(ANNOUNCE_SETTLE, self.poke)

    async def _withdraw(self, *, closing: bool = False) -> None:
        """No stream left (or the hub closes): stop asking writers for NOTIFYs (best
        effort; the announcement expires after ``READER_TTL`` anyway)."""
        async with self._announcing:
            if self._announced_at is None or ((self._subscribers or self._joining) and not closing):
                return
            self._announced_at = None
            try:
                persistence: Any = self.engine.kernel.deps.persistence
                await persistence.withdraw_event_reader(self.reader_id)
            except Exception as exc:
                self.log.warning("events.withdraw_failed", error=repr(exc))

    def _renew_in(self) -> float | None:
        """Seconds until the announcement needs renewing (``None``: none is held)."""
        if self._announced_at is None:
            return None
        return self._announced_at + READER_TTL / 3 - time.monotonic()

    async def wait_listening(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a bounded wait for tests and benchmarks
        """Start the hub and, on PostgreSQL, wait until its LISTEN is in place."""
        await self._ensure_started()
        if self._listener is not None:
            await self._listener.wait_listening(timeout)

    async def aclose(self) -> None:
        """Stop reading; every open stream ends."""
        for stop in self._stops:
            stop()
        self._stops.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None
        # Best effort and bounded: the announcement expires after ``READER_TTL`` anyway,
        # and closing must not wait on a database that does not answer.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._withdraw(closing=True), WITHDRAW_TIMEOUT)
        for subscription in list(self._subscribers):
            self._end(subscription)
        self._subscribers.clear()

    # -- the reader -------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._subscribers:
                # Nobody listens: no reads and no polling until a stream subscribes.
                self._gap_since = None
                await self._withdraw()
                if self._subscribers:
                    continue  # one subscribed meanwhile (and announced again)
                self._subscribed.clear()
                await self._subscribed.wait()
                continue
            renew_in = self._renew_in()
            if renew_in is None or renew_in <= 0:  # not announced (or a withdraw raced)
                await self._announce(renew=True)
                renew_in = self._renew_in()
            timeout = self.poll_interval
            if renew_in is not None:
                timeout = max(0.01, renew_in if timeout is None else min(timeout, renew_in))
            if self._gap_since is not None:
                left = self.gap_wait - (time.monotonic() - self._gap_since)
                timeout = max(0.01, min(left, timeout if timeout is not None else left))
            if timeout is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if not self._subscribers:
                continue
            try:
                await self._read()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving; retry after a short back-off
                failures += 1
                self.log.warning("events.read_failed", error=repr(exc), failures=failures)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                self._wake.set()

    async def _read(self) -> None:
        while True:
            rows = await self.engine.outbox.feed(self.cursor, limit=READ_BATCH)
            if not self._subscribers:
                return
            if not rows:
                self._gap_since = None
                return
            if any(s.needs_workflow for s in self._subscribers):
                for run_id in {event.workflow_run_id for _, event in rows}:
                    await self.workflow_of(run_id)
            for outbox_id, event in rows:
                if outbox_id <= self.cursor:
                    continue  # a subscribe caught the cursor up meanwhile
                if outbox_id != self.cursor + 1 and not self._gap_expired():
                    return  # hold back until the gap fills or expires (see the docstring)
                self._gap_since = None
                self.cursor = outbox_id
                self._fan_out(outbox_id, event)
            if len(rows) < READ_BATCH:
                return

    def _gap_expired(self) -> bool:
        if self.gap_wait <= 0:
            return True
        now = time.monotonic()
        if self._gap_since is None:
            self._gap_since = now
            return False
        return now - self._gap_since >= self.gap_wait

    def _fan_out(self, outbox_id: int, event: EventBase) -> None:
        workflow_id = getattr(event, "workflow_id", None)
        run_id = event.workflow_run_id
        if isinstance(workflow_id, str):
            if len(self._workflows) > 100_000:
                self._workflows.clear()
            self._workflows[run_id] = workflow_id
        else:
            workflow_id = self._workflows.get(run_id)
        for subscription in list(self._subscribers):
            try:
                wanted = subscription.wants(outbox_id, event, workflow_id)
            except Exception:  # a filter's bug ends that stream only
                wanted = False
            if not wanted:
                continue
            try:
                subscription.queue.put_nowait((outbox_id, event))
            except asyncio.QueueFull:
                self._end(subscription)

    async def workflow_of(self, run_id: str) -> str | None:
        """The workflow of ``run_id`` (cached; read once for runs older than the hub)."""
        found = self._workflows.get(run_id)
        if found is None:
            try:
                found = (await self.engine.get_run(run_id, with_stages=False)).workflow_id
            except Exception:
                return None
            self._workflows[run_id] = found
        return found

    def _end(self, subscription: Subscription) -> None:
        subscription.dropped = True
        self._subscribers.discard(subscription)
        while True:  # make room for the end marker
            try:
                subscription.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    subscription.queue.get_nowait()
