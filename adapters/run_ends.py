"""In-process watchers of finished runs, told by a Persistence after its commit.

``RunHandle.result`` should answer the moment a run ends, not at its next poll.
Every adapter already sees the events a transaction appends; when one of them ends a
run (``RUN_END_EVENTS``), the adapter notes the run id on the transaction and, once
that transaction has committed, tells its ``RunEndWatchers``. A waiter in the same
process therefore wakes without polling. On PostgreSQL a waiter in another process
marks the run first, and the ``runs`` trigger sends ``NOTIFY treadle_jobs,
'end:<run id>'`` with the commit that ends a marked run, delivered by the
``PgJobListener`` (``adapters/sql/wake_interest.py``). Polling stays the fallback
everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from treadle.adapters.watchers import Watchers
from treadle.kernel.model import Run

RUN_END_PREFIX = "end:"
"""The NOTIFY payload prefix of finished runs (``end:<id>``; ``end:<id>,<id>`` parses
too)."""

RunEndCallback = Callable[[Sequence[str], Mapping[str, Run]], None]
"""``callback(run_ids, outcomes)``: ``outcomes`` holds, by id, the finished runs as the
commit wrote them (without stages), for the runs whose final write the transaction saw."""


class RunEndWatchers(Watchers[[Sequence[str], Mapping[str, Run]]]):
    """Told ``callback(run_ids, outcomes)`` after each commit that ended runs (the
    outcomes the commit wrote, by run id, where it knows them)."""

    __slots__ = ()

    def tell(self, run_ids: Sequence[str], outcomes: Mapping[str, Run] | None = None) -> None:
        super().tell(run_ids, outcomes or {})


def ended_run_ids(payload: str) -> list[str] | None:
    """The run ids of a ``end:<ids>`` NOTIFY payload; ``None`` for any other payload."""
    if not payload.startswith(RUN_END_PREFIX):
        return None
    return [part for part in payload[len(RUN_END_PREFIX) :].split(",") if part]
