"""``treadle.migrate(url)``: the public, blocking way to bring a database to head."""

from __future__ import annotations

import treadle
from treadle.adapters.sql import current_revision, head_revision


def test_treadle_migrate_brings_a_sqlite_file_to_head(sqlite_url: str) -> None:
    """treadle.migrate creates the schema and is idempotent."""
    assert current_revision(sqlite_url) is None
    treadle.migrate(sqlite_url)
    treadle.migrate(sqlite_url)
    assert current_revision(sqlite_url) == head_revision()
