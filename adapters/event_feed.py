"""The all-runs event feed: every stored event in outbox order, and who to tell of new ones.

``tx.outbox.events_after(after_id, limit)`` reads the events appended after outbox row
``after_id`` (each with its row id, the feed's cursor). Live readers (the HTTP server's
SSE streams) learn that there is something to read without polling:

- in this process, the persistence tells its ``EventWatchers`` after each commit that
  appended events (``persistence.watch_events(callback)``), on every adapter;
- across processes on PostgreSQL, the same commit carries ``NOTIFY treadle_events``
  (empty payload; PostgreSQL folds the repeats of one transaction) while a live reader
  is announced (``adapters/sql/wake_interest.py``), which a listener on that channel
  hears (``PgJobListener(url, channel=EVENTS_CHANNEL)``).

SQLite has no cross-process push: readers in another process poll (see
docs/http-api.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from treadle.adapters.watchers import Watchers

EVENTS_CHANNEL: Final = "treadle_events"
"""The PostgreSQL NOTIFY channel of appended events (payload empty)."""

EventCallback = Callable[[], None]


class EventWatchers(Watchers[[]]):
    """Told ``callback()`` after each commit that appended events."""

    __slots__ = ()
