"""When the next piece of timed work falls due, so a worker can sleep until then.

Four kinds of work become due at a time rather than on an event (``DueKind``): a
queued job's retry backoff (``Job.next_poll_at``, kind ``job``), a suspended stage's
next check or a code workflow's timer (``StageRun.next_poll_at``, kind ``poll``), a
command the Scheduler holds (kind ``command``) and a cron schedule's next fire time
(kind ``schedule``). A worker that only looked at them on
its maintenance tick (every 10 s by default) would run a 2 s retry up to 10 s late.

A worker keeps the due times it knows in a ``DueSchedule`` and sleeps until the
earliest (and until its next tick, whichever is first). It learns them three ways:

* after each full tick, ``next_due_times`` asks the ports for the earliest of each kind;
* the commits of its own process tell it (``Persistence.watch_due``), whoever made
  them: its own executions, an ``Engine`` call, a scheduler call;
* on PostgreSQL, the commits of other processes send ``NOTIFY treadle_jobs,
  'due:...'`` (``adapters/due_times.py``), which its wake source hands it.

A due time learned late or not at all costs lateness, never correctness: the next tick
takes whatever is due.
"""

from __future__ import annotations

import heapq
import inspect
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from treadle.adapters.due_times import DUE_KINDS, DueKind

if TYPE_CHECKING:
    from treadle.kernel.kernel import Kernel

MAX_KNOWN = 4096
"""Due times a ``DueSchedule`` keeps per kind; past it the latest are forgotten (the
tick finds them). Bounds memory when other processes create timed work faster than it
falls due."""


class DueSchedule:
    """The due times a worker knows, per kind, earliest first. Times past are taken off
    by ``take_due``; a time whose work another worker took meanwhile only costs a wake-up
    that finds nothing."""

    __slots__ = ("_heaps",)

    def __init__(self) -> None:
        self._heaps: dict[DueKind, list[datetime]] = {kind: [] for kind in DUE_KINDS}

    def add(self, kind: DueKind, when: datetime) -> bool:
        """Remember ``when``; true if it is now the earliest known of ``kind`` (the
        sleeper must wake sooner than it planned)."""
        heap = self._heaps[kind]
        first = not heap or when < heap[0]
        if heap and heap[0] == when:
            return False
        heapq.heappush(heap, when)
        if len(heap) > MAX_KNOWN:
            heap[:] = heapq.nsmallest(MAX_KNOWN // 2, heap)  # sorted: still a heap
        return first

    def earliest(self, kinds: Iterable[DueKind]) -> datetime | None:
        found = [self._heaps[kind][0] for kind in kinds if self._heaps[kind]]
        return min(found, default=None)

    def take_due(self, kinds: Iterable[DueKind], now: datetime) -> set[DueKind]:
        """Forget the times of ``kinds`` at or before ``now``; returns the kinds that had
        any (their work is due: the caller takes it)."""
        due: set[DueKind] = set()
        for kind in kinds:
            heap = self._heaps[kind]
            while heap and heap[0] <= now:
                heapq.heappop(heap)
                due.add(kind)
        return due


async def next_due_times(kernel: Kernel) -> dict[DueKind, datetime]:
    """The earliest due time of each kind among queued jobs, suspended stages,
    scheduled commands and cron schedules, as storage has them (a port without the
    query is skipped)."""
    deps = kernel.deps
    found: dict[DueKind, datetime] = {}
    sources: tuple[tuple[DueKind, Any], ...] = (
        ("job", getattr(deps.job_transport, "next_due_at", None)),
        ("poll", getattr(deps.persistence, "next_suspended_poll_at", None)),
        ("command", getattr(deps.scheduler, "next_due_at", None)),
    )
    for kind, source in sources:
        if source is None:
            continue
        value: Any = source()
        if inspect.isawaitable(value):
            value = await value
        if value is not None:
            found[kind] = value
    if deps.cron is not None:  # a kernel without a calendar fires no schedules
        try:  # the SQL adapters read without SQLite's write lock; others take no option
            scope: Any = deps.persistence.transaction(read_only=True)  # type: ignore[call-arg]
        except TypeError:
            scope = deps.persistence.transaction()
        async with scope as tx:
            fire_at = await tx.schedules.next_fire_at()
        if fire_at is not None:
            found["schedule"] = fire_at
    return found
