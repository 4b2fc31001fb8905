"""Due times a commit creates, told to the workers that take them when they fall due.

Timed work (a retry's backoff, a suspended stage's next check or a code workflow's
timer, a scheduled command) is due at a time, not on an event. A worker sleeps until
the earliest due time it knows; the question is how it learns of one that another
process created. An adapter notes each due time a transaction writes, by kind (the
earliest per kind is enough: a worker that wakes for it finds the rest in storage or
in later notes), and once the transaction commits:

* tells its in-process ``DueWatchers`` (the workers of this process, whatever path
  committed: a worker's own execution, an ``Engine`` call, a scheduler call);
* on PostgreSQL, the same commit carries one ``NOTIFY`` with payload ``due:<kinds>``
  (``due_payload``), delivered to the other processes' ``PgJobListener`` and parsed
  there with ``parse_due``.

Both are hints. A lost one (a listener reconnecting, a process that missed it) costs
lateness up to the worker's next maintenance tick, which asks storage again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Literal, get_args

from treadle.adapters.watchers import Watchers

DueKind = Literal["job", "poll", "command", "schedule"]
"""What falls due: ``job`` a queued job's ``next_poll_at`` (taken by a dequeue), ``poll``
a suspended stage's ``next_poll_at`` (taken by ``stage.pollSuspended``), ``command`` a
scheduled command's ``run_at`` (taken by the tick's ``scheduled`` step), ``schedule`` a
cron schedule's ``next_fire_at`` (taken by the tick's ``schedules`` step)."""

DUE_KINDS: tuple[DueKind, ...] = get_args(DueKind)

DUE_PREFIX = "due:"
"""The NOTIFY payload prefix: ``due:job=<iso>,poll=<iso>`` (only the kinds present)."""

DueTimes = Mapping[DueKind, datetime]


def earliest(known: dict[DueKind, datetime], kind: DueKind, when: datetime) -> None:
    """Keep in ``known`` the earliest ``when`` of ``kind`` (what a transaction notes)."""
    current = known.get(kind)
    if current is None or when < current:
        known[kind] = when


def due_payload(due: DueTimes) -> str:
    """The NOTIFY payload of ``due`` (timezone-aware UTC times, ISO 8601 in full)."""
    return DUE_PREFIX + ",".join(f"{kind}={as_utc(when).isoformat()}" for kind, when in due.items())


def parse_due(payload: str) -> dict[DueKind, datetime] | None:
    """The due times of a ``due:`` payload; ``None`` for any other payload. A part that is
    not ``<kind>=<ISO time>`` is skipped (a newer sender's kind, say): a hint, not data
    anything depends on."""
    if not payload.startswith(DUE_PREFIX):
        return None
    out: dict[DueKind, datetime] = {}
    for part in payload[len(DUE_PREFIX) :].split(","):
        kind, _, text = part.partition("=")
        if kind not in DUE_KINDS:
            continue
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            continue
        earliest(out, kind, as_utc(when))
    return out


def as_utc(when: datetime) -> datetime:
    """``when`` in UTC; a naive time is taken as UTC (SQLite hands some back naive, and
    the SQL adapters store naive times as UTC)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


DueCallback = Callable[[DueTimes], None]


class DueWatchers(Watchers[[DueTimes]]):
    """Told ``callback(due)`` after each commit that created due times."""

    __slots__ = ()
