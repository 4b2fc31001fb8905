"""The WakeSource port: an optional push signal that new jobs may be queued.

Polling is always the fallback; a wake source only makes an idle worker react
sooner. The PostgreSQL backend provides one (``LISTEN treadle_jobs``); SQLite
and the in-memory backend have none. A host subscribes a cheap, idempotent
callback (the Worker's ``_on_wake``); a wake source may call it spuriously (after
a reconnect, notifications sent meanwhile are lost, so it wakes everyone once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class WakeSource(Protocol):
    """Calls its subscribers when jobs may have become available."""

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(kind)`` (on the subscriber's event loop) on each wake-up until
        the returned function is called. ``kind`` is ``"jobs"`` (jobs were queued),
        ``"run"`` (a run is waiting to be claimed), ``"end:<ids>"`` (runs finished that a
        waiter or a worker asked to hear of),
        ``"due:<kind>=<time>,..."`` (timed work falls due then, see
        ``adapters/due_times.py``) or ``""`` (anything may have changed, e.g. after a
        reconnect). Must be called from a running event loop."""
        ...

    async def aclose(self) -> None:
        """Stop listening and release the connection. Idempotent."""
        ...
