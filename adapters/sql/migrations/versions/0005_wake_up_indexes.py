"""Partial indexes for the reads of a code workflow's wake-up, so none of them walks the
run's history (issue 11, sticky execution):

* ``ix_signal_inbox_unconsumed``: ``next_signal``, the oldest unconsumed message of a
  name, without stepping over every message consumed before it;
* ``ix_journal_waiting``: the entries a run waits on (``get_journal(status=WAITING)``,
  read by every signal hand-over and every run's end);
* ``ix_timers_live``: ``pending_timers``, a run's unfired timers.

Both dialects support partial indexes, and their planners use one when the query
repeats its condition, as these queries do.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = [
    ("ix_signal_inbox_unconsumed", "signal_inbox", ["run_id", "name", "id"], "consumed_at IS NULL"),
    ("ix_journal_waiting", "journal", ["run_id", "position"], "status = 'WAITING'"),
    ("ix_timers_live", "timers", ["run_id", "fire_at"], "fired_at IS NULL"),
]


def upgrade() -> None:
    for name, table, columns, where in INDEXES:
        op.create_index(
            name,
            table,
            columns,
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
        )


def downgrade() -> None:
    for name, table, _, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
