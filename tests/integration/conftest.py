"""Fixtures for the SQL integration tests: fresh SQLite files and PostgreSQL databases.

Each PostgreSQL test gets a database of its own (``CREATE DATABASE`` through an
autocommit connection to the server's ``test`` database, ``DROP ... WITH (FORCE)``
afterwards). Where no server is reachable the tests skip, unless
``TREADLE_REQUIRE_POSTGRES=1`` turns the skip into a failure (CI).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

POSTGRES_URL = os.environ.get(
    "TREADLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _skip_or_fail_without_postgres(reason: str) -> None:
    """As ``tests/conftest.py``'s helper (not importable under importlib mode)."""
    if os.environ.get("TREADLE_REQUIRE_POSTGRES", "") not in ("", "0", "false"):
        pytest.fail(f"PostgreSQL is required (TREADLE_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(f"PostgreSQL not reachable: {reason}")


def pg_admin() -> Any:
    """An autocommit psycopg connection to the server's maintenance database."""
    import psycopg

    from treadle.adapters.sql import sync_url

    url = sync_url(POSTGRES_URL).set(drivername="postgresql")
    try:
        return psycopg.connect(
            url.render_as_string(hide_password=False), autocommit=True, connect_timeout=3
        )
    except psycopg.OperationalError as exc:
        _skip_or_fail_without_postgres(str(exc).strip() or repr(exc))
        raise AssertionError("unreachable") from exc


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'treadle.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    from treadle.adapters.sql import async_url

    name = f"treadle_t_{uuid.uuid4().hex[:12]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield async_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with contextlib.suppress(Exception), pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each dialect in turn: an empty database."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def pg_admin_connect() -> Any:
    """``with pg_admin_connect() as admin:``: an autocommit connection for DBA actions."""
    return pg_admin
