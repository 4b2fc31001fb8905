"""A GIN index on ``runs.search_attributes`` for ``list_runs(attributes=...)``.

PostgreSQL only: the adapter filters with JSONB containment (``@>``), which a GIN
index with the ``jsonb_path_ops`` operator class serves. SQLite has no such index;
there the revision does nothing, so both dialects share one revision history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_runs_search_attributes"


def _is_postgres() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    if _is_postgres():
        op.create_index(
            INDEX,
            "runs",
            ["search_attributes"],
            postgresql_using="gin",
            postgresql_ops={"search_attributes": "jsonb_path_ops"},
        )


def downgrade() -> None:
    if _is_postgres():
        op.drop_index(INDEX, table_name="runs")
