"""``outbox.retry_at``: after a failed publish, the event is not tried again before this
time (``outbox.flush`` backs off exponentially, ``KernelSettings.outbox_retry_delay``),
and its run's later events wait with it.

Nullable, no default: rows from before it are due at once, as they were.

Revision ID: 0014_outbox_retry_at
Revises: 0012_trace_context
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_outbox_retry_at"
down_revision: str | None = "0012_trace_context"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable ADD COLUMN is a catalogue change on both dialects: no table rewrite.
    op.add_column("outbox", sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:  # SQLite rebuilds the table to drop one
        batch.drop_column("retry_at")
