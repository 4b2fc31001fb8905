"""Fixtures for the CLI tests: a fresh SQLite file per test and an ``invoke`` helper
that runs ``treadle`` in-process through Typer's ``CliRunner``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from treadle.hosts.cli import build_app
from treadle.testing.databases import postgres_database, sqlite_database
from treadle.tests.cli.cliapp import APP

Invoke = Callable[..., Result]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return sqlite_database(tmp_path, name="cli.db")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own TREADLE_* settings must not leak into the tests."""
    for name in (
        "TREADLE_DATABASE_URL",
        "TREADLE_APP",
        "TREADLE_DEBUG",
        "TREADLE_BLOBS_URL",
        "TREADLE_WEBHOOK_URL",
        "TREADLE_WEBHOOK_SECRET",
        "TREADLE_WEBHOOK_ALLOW",
    ):
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


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test, dropped afterwards; skips (or
    fails under ``TREADLE_REQUIRE_POSTGRES=1``) where no server is reachable."""
    with postgres_database(prefix="treadle_cli") as url:
        yield url
