"""The all-runs event feed: every stored event in outbox order, and who to tell of new ones.

``tx.outbox.events_after(after_id, limit)`` reads the events appended after outbox row
``after_id`` (each with its row id, the feed's cursor). Live readers (the HTTP server's
SSE streams) learn that there is something to read without polling:

- in this process, the persistence tells its ``EventWatchers`` after each commit that
  appended events (``persistence.watch_events(callback)``), on every adapter;
- across processes on PostgreSQL, the same commit carries ``NOTIFY treadle_events``
  (empty payload; PostgreSQL folds the repeats of one transaction), which a listener
  on that channel hears (``PgJobListener(url, channel=EVENTS_CHANNEL)``).

SQLite has no cross-process push: readers in another process poll (see
docs/http-api.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

EVENTS_CHANNEL: Final = "treadle_events"
"""The PostgreSQL NOTIFY channel of appended events (payload empty)."""

EventCallback = Callable[[], None]


class EventWatchers:
    """Callbacks told after each commit that appended events. Cheap when nobody watches."""

    __slots__ = ("_callbacks",)

    def __init__(self) -> None:
        self._callbacks: list[EventCallback] = []

    def watch(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback()`` after each commit that appended events; returns the
        function that stops it (idempotent)."""
        self._callbacks.append(callback)

        def stop() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return stop

    def tell(self) -> None:
        """Called by the adapter after the commit; a failing callback is skipped (the
        commit already happened)."""
        for callback in tuple(self._callbacks):
            try:
                callback()
            except Exception:  # a watcher's bug must not surface in the committer
                continue

    def __bool__(self) -> bool:
        return bool(self._callbacks)
