"""Fixtures for the SQL integration tests: fresh, *empty* SQLite files and PostgreSQL
databases (these tests migrate them themselves), from ``treadle.testing.databases``.

Each PostgreSQL test gets a database of its own, dropped afterwards. Where no server is
reachable the tests skip, unless ``TREADLE_REQUIRE_POSTGRES=1`` turns the skip into a
failure (CI).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from treadle.testing.databases import postgres_admin, postgres_database, sqlite_database


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return sqlite_database(tmp_path)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each dialect in turn: an empty database."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def pg_admin_connect() -> Any:
    """``with pg_admin_connect() as admin:``: an autocommit connection for DBA actions."""
    return postgres_admin
