"""Fixtures for the crash tests: a migrated database per test, SQLite or PostgreSQL.

PostgreSQL as in ``tests/integration/conftest.py`` (a fresh database per test through
the server's ``test`` database; skipped where no server is reachable unless
``TREADLE_REQUIRE_POSTGRES=1`` turns the skip into a failure).
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


def _pg_admin() -> Any:
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
def _postgres_url() -> Iterator[str]:
    from treadle.adapters.sql import async_url, migrate

    name = f"treadle_crash_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = async_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        migrate(url)  # a worker only checks the schema: `treadle migrate` is a deploy step
        yield url
    finally:
        with contextlib.suppress(Exception), _pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each dialect in turn: a migrated, empty database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'crash.db'}"
    return str(request.getfixturevalue("_postgres_url"))


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'crash.db'}"


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
