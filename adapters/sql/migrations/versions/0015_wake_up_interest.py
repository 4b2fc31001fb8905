"""Who wants to be woken: ``run_end_waiters`` and ``event_readers``, and the trigger that
sends a run's ``end:<id>`` NOTIFY only when someone waits for it.

In PostgreSQL every NOTIFY signals every backend LISTENing in the database (whatever
its channel), and each of them runs a transaction to read the queue. A NOTIFY nobody
needs therefore costs a commit per listener. So the wake-ups that usually have no
reader are now sent only to those who said they wait (``adapters/sql/wake_interest.py``):

- ``run_end_waiters``: a ``RunHandle.result`` waiting in another process marks its run
  (``run_id``), a worker whose claim found a concurrency limit full marks ``*`` (any
  run's end may free a slot). ``expires_at`` bounds a mark nobody removes.
- ``event_readers``: a live event-feed reader (``treadle serve``'s SSE hub) announces
  itself for a TTL; commits that append events send ``NOTIFY treadle_events`` only while
  one is live (``outbox.FEED_NOTIFY``).

PostgreSQL only, the trigger ``runs_end_notify``: after an UPDATE that leaves a run
terminal, it deletes the run's mark and, if there was one (or a live ``*``), sends
``end:<id>`` on ``treadle_jobs``. Its queries take their own snapshot after the UPDATE
locked the run's row; the marker locks that row ``FOR SHARE`` in the statement that
marks, so either the mark commits before the ending UPDATE can lock the row (and the
trigger sees it) or the marker's lock waits for the ending commit (and its read sees the
end). No wake-up can fall between. SQLite has the tables (one schema) but no NOTIFY.

Revision ID: 0015_wake_up_interest
Revises: 0014_outbox_retry_at
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015_wake_up_interest"
down_revision: str | None = "0014_outbox_retry_at"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = """
CREATE OR REPLACE FUNCTION treadle_notify_run_end() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM run_end_waiters WHERE run_id = NEW.id;
    IF FOUND OR EXISTS (
        SELECT FROM run_end_waiters WHERE run_id = '*' AND expires_at > now()
    ) THEN
        PERFORM pg_notify('treadle_jobs', 'end:' || NEW.id);
    END IF;
    RETURN NULL;
END
$$
"""

_TRIGGER = """
CREATE TRIGGER runs_end_notify AFTER UPDATE ON runs
FOR EACH ROW WHEN (NEW.status IN ('COMPLETED', 'FAILED', 'CANCELLED'))
EXECUTE FUNCTION treadle_notify_run_end()
"""


def _is_postgres() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    key = sa.String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql")
    when = sa.DateTime(timezone=True)
    op.create_table(
        "run_end_waiters",
        sa.Column("run_id", key, nullable=False),
        sa.Column("expires_at", when, nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_run_end_waiters"),
    )
    op.create_table(
        "event_readers",
        sa.Column("reader_id", key, nullable=False),
        sa.Column("expires_at", when, nullable=False),
        sa.PrimaryKeyConstraint("reader_id", name="pk_event_readers"),
    )
    if _is_postgres():
        op.execute(_FUNCTION)
        op.execute(_TRIGGER)


def downgrade() -> None:
    if _is_postgres():
        op.execute("DROP TRIGGER IF EXISTS runs_end_notify ON runs")
        op.execute("DROP FUNCTION IF EXISTS treadle_notify_run_end()")
    op.drop_table("event_readers")
    op.drop_table("run_end_waiters")
