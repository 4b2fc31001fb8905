"""Scenario fixtures: ``url``, each backend in turn, for the tests that run a scenario
through ``Engine.open`` on memory, a SQLite file and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from treadle.testing.databases import sqlite_database


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """``memory://``, an empty SQLite file (``Engine.open`` migrates a SQLite file
    itself), then a fresh migrated PostgreSQL database (a copy of the session's template,
    see ``treadle_postgres_url``)."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return sqlite_database(tmp_path)
    return str(request.getfixturevalue("treadle_postgres_url"))
