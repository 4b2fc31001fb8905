"""Run lifecycle: ``runs.paused`` and ``runs.terminated`` (``run.pause``, ``run.resume``,
``run.terminate``), and the index retention's ``run.purge`` selects expired runs by.

Both columns are NOT NULL with a server default of false, so existing rows read as
neither paused nor terminated, and an insert that does not name them (an older worker
during a rolling deploy) gets the same.

Revision ID: 0008
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # ADD COLUMN with a constant default is a catalogue change on PostgreSQL 11+ and SQLite.
    op.add_column(
        "runs", sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column(
        "runs", sa.Column("terminated", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.create_index("ix_runs_status_completed_at", "runs", ["status", "completed_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_status_completed_at", table_name="runs")
    with op.batch_alter_table("runs") as batch:  # SQLite rebuilds the table to drop them
        batch.drop_column("terminated")
        batch.drop_column("paused")
