"""In-process watchers of finished runs, told by a Persistence after its commit.

``RunHandle.result`` should answer the moment a run ends, not at its next poll.
Every adapter already sees the events a transaction appends; when one of them ends a
run (``RUN_END_EVENTS``), the adapter notes the run id on the transaction and, once
that transaction has committed, tells its ``RunEndWatchers``. A waiter in the same
process therefore wakes without polling; on PostgreSQL the same commit also carries a
``NOTIFY`` (payload ``end:<run ids>``) for waiters in other processes, delivered by
the ``PgJobListener``. Polling stays the fallback everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from treadle.kernel.model import Run

RUN_END_PREFIX = "end:"
"""The NOTIFY payload prefix of finished runs (``end:<id>,<id>``)."""

RunEndCallback = Callable[[Sequence[str], Mapping[str, Run]], None]
"""``callback(run_ids, outcomes)``: ``outcomes`` holds, by id, the finished runs as the
commit wrote them (without stages), for the runs whose final write the transaction saw."""


class RunEndWatchers:
    """The callbacks to tell of runs that finished. Cheap when nobody watches."""

    __slots__ = ("_callbacks",)

    def __init__(self) -> None:
        self._callbacks: list[RunEndCallback] = []

    def watch(self, callback: RunEndCallback) -> Callable[[], None]:
        """Call ``callback(run_ids, outcomes)`` after each commit that ended runs;
        returns the function that stops it (idempotent)."""
        self._callbacks.append(callback)

        def stop() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return stop

    def tell(self, run_ids: Sequence[str], outcomes: Mapping[str, Run] | None = None) -> None:
        """Called by the adapter after a commit; a failing callback does not stop the
        others (and never fails the commit that already happened)."""
        known: Mapping[str, Run] = outcomes or {}
        for callback in tuple(self._callbacks):
            try:
                callback(run_ids, known)
            except Exception:  # a waiter's bug must not surface in the committer
                continue


def ended_run_ids(payload: str) -> list[str] | None:
    """The run ids of a ``end:<ids>`` NOTIFY payload; ``None`` for any other payload."""
    if not payload.startswith(RUN_END_PREFIX):
        return None
    return [part for part in payload[len(RUN_END_PREFIX) :].split(",") if part]
