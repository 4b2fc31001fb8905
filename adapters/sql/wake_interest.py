"""Who wants a wake-up NOTIFY, so that commits send only the ones somebody reads.

In PostgreSQL every NOTIFY signals every backend LISTENing in the database, whatever
its channel, and each signalled backend runs a transaction to read the queue: a
notification nobody needs costs one commit per listener (the engine's own listener
included, which then drops it as sent by its own pool). Two of Treadle's wake-ups
usually have no reader, so they are sent only to those who asked (migration 0015):

- **A run's end** (``end:<id>`` on ``treadle_jobs``). A waiter in this process is told
  in-process (``RunEndWatchers``); one in another process marks the run in
  ``run_end_waiters`` (``mark_run_end``) before it reads the run, and PostgreSQL's
  trigger ``runs_end_notify`` sends the NOTIFY when the UPDATE that ends a marked run
  commits. The marking statement also locks the run's row ``FOR SHARE``, which closes
  the race: either the mark commits before the ending UPDATE locks the row (the
  trigger's query, run after the lock, sees it), or the lock waits for the ending
  commit (and the waiter's read after it sees the end). A worker whose claim found a
  concurrency limit full marks ``*`` for a TTL: any run's end may free its slot.
- **Appended events** (``treadle_events``), which only a live event-feed reader (the
  HTTP server's SSE hub, usually in another process) waits on. A reader announces
  itself in ``event_readers`` for a TTL and renews it while it has clients
  (``announce_reader``); commits that append events send the NOTIFY only while a live
  announcement exists (``FEED_NOTIFY``, a condition inside their own statement: no
  extra round trip). A commit whose statement began before the first announcement was
  committed cannot see it; the reader reads once more a moment after announcing, and
  keeps its safety poll.

SQLite has the tables (one schema for both) but no NOTIFY: every function here is a
no-op there.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from treadle.adapters.event_feed import EVENTS_CHANNEL

__all__ = [
    "ANY_RUN",
    "FEED_NOTIFY",
    "RUN_END_MARK_TTL",
    "announce_reader",
    "mark_any_run_end",
    "mark_run_end",
    "withdraw_reader",
]

RUN_END_MARK_TTL: Final = 3600.0
"""How long a result waiter's mark lasts unless the run's end removes it first (a waiter
still waiting marks again)."""

ANY_RUN: Final = "*"
"""The ``run_end_waiters`` mark that asks for the end of every run."""

FEED_NOTIFY: Final = (
    f"(SELECT pg_notify('{EVENTS_CHANNEL}', '') WHERE EXISTS "
    "(SELECT FROM event_readers WHERE expires_at > now()))"
)
"""A scalar SQL expression: ``NOTIFY treadle_events`` on commit if a live event reader
is announced (``NULL`` either way)."""

_MARK_RUN_END = sa.text(
    # The run's row, locked FOR SHARE first (it waits for an uncommitted end, then reads
    # the ended row); a run already ended gets no mark (nothing would remove it).
    "WITH run AS (SELECT status FROM runs WHERE id = :run_id FOR SHARE), "
    "mark AS (INSERT INTO run_end_waiters (run_id, expires_at) "
    "SELECT :run_id, now() + make_interval(secs => :ttl) WHERE NOT EXISTS "
    "(SELECT FROM run WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')) "
    "ON CONFLICT (run_id) DO UPDATE SET expires_at = "
    "greatest(run_end_waiters.expires_at, excluded.expires_at) RETURNING 1), "
    # Marks of runs that never ended (their waiters gave up) go once they expire.
    "gone AS (DELETE FROM run_end_waiters WHERE expires_at < now() AND run_id <> :run_id) "
    "SELECT (SELECT count(*) FROM mark) AS marked, (SELECT status FROM run) AS status"
).bindparams(sa.bindparam("ttl", type_=sa.Float()))

_ANNOUNCE = sa.text(
    "INSERT INTO event_readers (reader_id, expires_at) "
    "VALUES (:reader_id, now() + make_interval(secs => :ttl)) "
    "ON CONFLICT (reader_id) DO UPDATE SET expires_at = excluded.expires_at"
).bindparams(sa.bindparam("ttl", type_=sa.Float()))

_WITHDRAW = sa.text("DELETE FROM event_readers WHERE reader_id = :reader_id")


def _is_postgres(connection: AsyncConnection) -> bool:
    return connection.dialect.name == "postgresql"


async def mark_run_end(connection: AsyncConnection, run_id: str, ttl: float) -> str | None:
    """Ask for ``run_id``'s ``end:`` NOTIFY (for ``ttl`` seconds at most); returns the
    run's status read under the row lock (``None``: no such run, or not PostgreSQL).
    Commit before reading the run: the lock is what makes the mark race-free."""
    if not _is_postgres(connection):
        return None
    row = (await connection.execute(_MARK_RUN_END, {"run_id": run_id, "ttl": ttl})).first()
    return None if row is None or row.status is None else str(row.status)


async def mark_any_run_end(connection: AsyncConnection, ttl: float) -> None:
    """Ask for every run's ``end:`` NOTIFY for ``ttl`` seconds (see ``ANY_RUN``)."""
    if _is_postgres(connection):
        await connection.execute(_MARK_RUN_END, {"run_id": ANY_RUN, "ttl": ttl})


async def announce_reader(connection: AsyncConnection, reader_id: str, ttl: float) -> None:
    """Announce (or renew) a live event-feed reader for ``ttl`` seconds."""
    if _is_postgres(connection):
        await connection.execute(_ANNOUNCE, {"reader_id": reader_id, "ttl": ttl})


async def withdraw_reader(connection: AsyncConnection, reader_id: str) -> None:
    """The reader has no client any more: commits stop notifying once no other is live."""
    if _is_postgres(connection):
        await connection.execute(_WITHDRAW, {"reader_id": reader_id})
