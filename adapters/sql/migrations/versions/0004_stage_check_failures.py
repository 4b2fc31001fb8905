"""``stages.check_failures``: consecutive completion checks of a suspended stage that
raised, so the bound on them (``max_check_failures``) holds across restarts.

Existing rows start at 0, as a stage whose failed checks were never counted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN on both dialects: SQLite accepts NOT NULL with a default.
    op.add_column(
        "stages", sa.Column("check_failures", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    with op.batch_alter_table("stages") as batch:  # SQLite rebuilds the table to drop one
        batch.drop_column("check_failures")
