"""Telling this process that jobs were queued, after the commit that queued them.

Other processes hear of new jobs through the wake source (PostgreSQL ``NOTIFY``), which
drops this process's own notifications (its worker learns of them in-process). A
consumer that is not the worker, such as the remote worker protocol's long-poll
(``hosts/http/workers.py``), watches here instead: the SQL persistence tells it the
queues of the QUEUED jobs each commit created. Cheap when nobody watches; no SQL.
"""

from __future__ import annotations

from collections.abc import Callable

from treadle.adapters.watchers import Watchers

QueuedCallback = Callable[[frozenset[str]], None]


class QueuedJobWatchers(Watchers[[frozenset[str]]]):
    """Told ``callback(queues)``, after a commit, of the queues that got new QUEUED jobs."""

    __slots__ = ()
