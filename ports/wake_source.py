"""The WakeSource port: an optional push signal that new jobs may be queued.

Polling is always the fallback; a wake source only makes an idle worker react
sooner. The PostgreSQL backend provides one (``LISTEN treadle_jobs``); SQLite
and the in-memory backend have none. A host subscribes a cheap, idempotent
callback (``Worker.notify``); a wake source may call it spuriously (after a
reconnect, notifications sent meanwhile are lost, so it wakes everyone once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class WakeSource(Protocol):
    """Calls its subscribers when jobs may have become available."""

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (on the subscriber's event loop) on each wake-up until the
        returned function is called. Must be called from a running event loop."""
        ...

    async def aclose(self) -> None:
        """Stop listening and release the connection. Idempotent."""
        ...
