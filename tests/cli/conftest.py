"""Fixtures for the CLI tests: a fresh SQLite file per test and an ``invoke`` helper
that runs ``treadle`` in-process through Typer's ``CliRunner``."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from treadle.hosts.cli import build_app
from treadle.tests.cli.cliapp import APP

Invoke = Callable[..., Result]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own TREADLE_* settings must not leak into the tests."""
    for name in ("TREADLE_DATABASE_URL", "TREADLE_APP", "TREADLE_DEBUG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def invoke(db_url: str) -> Invoke:
    """``invoke("runs", "list", db=..., app=...)``: global options first, then the args."""

    def run(*args: str, db: str | None = None, app: str | None = APP, **kw: Any) -> Result:
        argv = ["--db", db or db_url]
        if app is not None:
            argv += ["--app", app]
        return CliRunner().invoke(build_app(), [*argv, *args], **kw)

    return run


POSTGRES_URL = os.environ.get(
    "TREADLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pg_admin() -> Any:
    """An autocommit connection to the server's maintenance database; skips (or fails
    under ``TREADLE_REQUIRE_POSTGRES=1``) where no server is reachable."""
    import psycopg

    from treadle.adapters.sql import sync_url

    url = sync_url(POSTGRES_URL).set(drivername="postgresql")
    try:
        return psycopg.connect(
            url.render_as_string(hide_password=False), autocommit=True, connect_timeout=3
        )
    except psycopg.OperationalError as exc:
        if os.environ.get("TREADLE_REQUIRE_POSTGRES", "") not in ("", "0", "false"):
            pytest.fail(f"PostgreSQL is required (TREADLE_REQUIRE_POSTGRES=1): {exc}")
        pytest.skip(f"PostgreSQL not reachable: {exc}")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test, dropped afterwards."""
    name = f"treadle_cli_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        from treadle.adapters.sql import async_url

        yield async_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with contextlib.suppress(Exception), _pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
