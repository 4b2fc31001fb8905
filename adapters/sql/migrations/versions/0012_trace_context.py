"""Tracing: ``runs.trace_context``, the W3C ``traceparent`` a run's spans join.

Nullable, no default: a run from before it (or started with tracing off) has none, and
its spans form a trace derived from its id (docs/observability.md).

Revision ID: 0012_trace_context
Revises: 0013_ai_calls
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_trace_context"
down_revision: str | None = "0013_ai_calls"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("trace_context", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("trace_context")
