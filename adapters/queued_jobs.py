"""Telling this process that jobs were queued, after the commit that queued them.

Other processes hear of new jobs through the wake source (PostgreSQL ``NOTIFY``), which
drops this process's own notifications (its worker learns of them in-process). A
consumer that is not the worker, such as the remote worker protocol's long-poll
(``hosts/http/workers.py``), watches here instead: the SQL persistence tells it the
queues of the QUEUED jobs each commit created. Cheap when nobody watches; no SQL.
"""

from __future__ import annotations

from collections.abc import Callable

QueuedCallback = Callable[[frozenset[str]], None]


class QueuedJobWatchers:
    """The callbacks to tell, after a commit, which queues got new QUEUED jobs."""

    __slots__ = ("_callbacks",)

    def __init__(self) -> None:
        self._callbacks: list[QueuedCallback] = []

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def watch(self, callback: QueuedCallback) -> Callable[[], None]:
        """Call ``callback(queues)`` after each commit that queued jobs; returns the
        function that stops it (idempotent)."""
        self._callbacks.append(callback)

        def stop() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return stop

    def tell(self, queues: frozenset[str]) -> None:
        """Called by the adapter after a commit; a failing callback does not stop the
        others (and never fails the commit that already happened)."""
        for callback in tuple(self._callbacks):
            try:
                callback(queues)
            except Exception:  # a consumer's bug must not surface in the committer
                continue
