"""The scheduler table: commands scheduled for later, drained by the maintenance tick.

Types are spelled out here (not imported from ``schema``), as in 0001, so this revision
keeps creating exactly the same table whatever later code does.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scheduled_commands",
        sa.Column(
            "key",
            sa.String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "command", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_scheduled_commands"),
    )
    op.create_index("ix_scheduled_commands_run_at_key", "scheduled_commands", ["run_at", "key"])


def downgrade() -> None:
    op.drop_index("ix_scheduled_commands_run_at_key", table_name="scheduled_commands")
    op.drop_table("scheduled_commands")
