"""Flow control: ``runs.concurrency_key`` and the indexes that count a workflow's runs
holding a slot (per key) and its starts within a rate window (``kernel/flow_control.py``).

Nullable, no default: runs from before it have no key, as a run started without one.

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    key = sa.String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql")
    op.add_column("runs", sa.Column("concurrency_key", key, nullable=True))
    op.create_index("ix_runs_flow", "runs", ["workflow_id", "status", "concurrency_key"])
    op.create_index("ix_runs_workflow_id_started_at", "runs", ["workflow_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_workflow_id_started_at", table_name="runs")
    op.drop_index("ix_runs_flow", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("concurrency_key")
