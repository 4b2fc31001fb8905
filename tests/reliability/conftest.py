"""Fixtures for the crash tests: a migrated database per test, SQLite or PostgreSQL.

PostgreSQL through the treadle plugin's ``treadle_postgres_url`` (a fresh copy of a
migrated template per test; skipped where no server is reachable unless
``TREADLE_REQUIRE_POSTGRES=1`` turns the skip into a failure).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from treadle.testing.databases import sqlite_database


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each dialect in turn: an empty SQLite file, a migrated PostgreSQL database (a
    worker only checks the schema: `treadle migrate` is a deploy step)."""
    if request.param == "sqlite":
        return sqlite_database(tmp_path, name="crash.db")
    return str(request.getfixturevalue("treadle_postgres_url"))


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    return sqlite_database(tmp_path, name="crash.db")


@pytest.fixture
def crash_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory of marker files the app's stages and steps write."""
    path = tmp_path / "markers"
    path.mkdir()
    monkeypatch.setenv("TREADLE_CRASH_DIR", str(path))
    return path


@pytest.fixture
def workers() -> Iterator[list[Any]]:
    """Worker processes a test started; any still running are killed at its end."""
    started: list[Any] = []
    yield started
    for worker in started:
        worker.stop()
