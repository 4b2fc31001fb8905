"""``stages.error_traceback``: where a failed stage attempt raised its error, shortened to
the user's frames (``kernel.errors.short_traceback``), shown by ``treadle runs show``
and ``engine.get_run`` next to ``error``.

Nullable, no default: rows from before it have no traceback, as a stage whose error
Treadle raised itself (a timeout, a lost lease) has none.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable ADD COLUMN is a catalogue change on both dialects: no table rewrite.
    op.add_column("stages", sa.Column("error_traceback", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stages") as batch:  # SQLite rebuilds the table to drop one
        batch.drop_column("error_traceback")
