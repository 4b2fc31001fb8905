"""The ai_calls and ai_run_totals tables: recorded AI calls and each run's AI totals
(``adapters/sql/ai_calls.py``). Types are spelled out here (not imported from
``schema``), as in 0001.

Revision ID: 0013_ai_calls
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013_ai_calls"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    key = sa.String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql")
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "ai_calls",
        sa.Column("id", big_id, autoincrement=True, nullable=False),
        sa.Column("run_id", key, nullable=False),
        sa.Column("workflow_id", key, nullable=False),
        sa.Column("stage_id", key, nullable=True),
        sa.Column("step", key, nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("topic", sa.String(), nullable=True),
        sa.Column("call_type", sa.String(32), nullable=False),
        sa.Column("provider", sa.String(), nullable=True),
        sa.Column("model", key, nullable=False),
        sa.Column("prompt", json, nullable=True),
        sa.Column("response", json, nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_nanos", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("latency", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("failed_attempt", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ai_calls"),
    )
    op.create_index("ix_ai_calls_run_id_id", "ai_calls", ["run_id", "id"])
    op.create_index("ix_ai_calls_created_at", "ai_calls", ["created_at"])
    op.create_table(
        "ai_run_totals",
        sa.Column("run_id", key, nullable=False),
        sa.Column("total_cost_nanos", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("failed_calls", sa.Integer(), nullable=False),
        sa.Column("max_cost_nanos", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", name="pk_ai_run_totals"),
    )


def downgrade() -> None:
    op.drop_table("ai_run_totals")
    op.drop_index("ix_ai_calls_created_at", table_name="ai_calls")
    op.drop_index("ix_ai_calls_run_id_id", table_name="ai_calls")
    op.drop_table("ai_calls")
