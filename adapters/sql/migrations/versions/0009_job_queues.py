"""Named queues: ``jobs.queue`` (the dequeue index leads with it) and the ``workers``
table of the WorkerRegistry port.

Existing jobs land on the ``default`` queue, which is what a worker serves unless told
otherwise, so an upgrade changes nothing for deployments without named queues.

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _key() -> sa.types.TypeEngine[str]:
    return sa.String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql")


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # With a constant default, ADD COLUMN ... NOT NULL is a catalogue change on
    # PostgreSQL 11+ (no table rewrite); SQLite stores the default in the schema.
    op.add_column(
        "jobs", sa.Column("queue", sa.String(64), nullable=False, server_default="default")
    )
    op.drop_index("ix_jobs_dequeue", table_name="jobs")
    op.create_index(
        "ix_jobs_dequeue",
        "jobs",
        ["status", "queue", sa.text("priority DESC"), "next_poll_at", "seq"],
    )
    op.create_table(
        "workers",
        sa.Column("worker_id", _key(), primary_key=True),
        sa.Column("queues", _json(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_jobs_dequeue", table_name="jobs")
    op.create_index(
        "ix_jobs_dequeue", "jobs", ["status", sa.text("priority DESC"), "next_poll_at", "seq"]
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("queue")
