"""pytest plugin: ``treadle_engine``, ``fake_clock`` and fresh-database fixtures.

Mark a test ``@pytest.mark.treadle(workflows=[pipeline])`` to pre-register
workflows, or call ``treadle_engine.register(pipeline)`` inside it.

pytest imports this module (entry point ``pytest11``) before coverage starts, so
it imports Treadle itself only inside the fixtures; otherwise every module-level
line of the kernel would count as not covered.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from treadle.testing.clock import FakeClock
    from treadle.testing.engine import TestEngine


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "treadle(workflows=[...]): workflows the treadle_engine fixture registers"
    )


@pytest.fixture
def fake_clock() -> FakeClock:
    """A virtual clock at 2026-01-01T00:00Z that moves only when told to."""
    from treadle.testing.clock import FakeClock

    return FakeClock()


@pytest.fixture
def treadle_engine(request: pytest.FixtureRequest) -> TestEngine:
    """A fresh ``TestEngine`` per test, with the workflows of the ``treadle`` marker."""
    from treadle.testing.engine import TestEngine

    marker = request.node.get_closest_marker("treadle")
    workflows = list(marker.kwargs.get("workflows", ())) if marker is not None else []
    return TestEngine(workflows)


# -- databases (treadle.testing.databases): a migrated template per session, a copy per test


@pytest.fixture(scope="session")
def treadle_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URL of a migrated SQLite file, made once per session; copy it, never write it."""
    from treadle.testing.databases import sqlite_database

    directory = tmp_path_factory.mktemp("treadle-sqlite-template")
    return sqlite_database(directory, migrate=True, name="template.db")


@pytest.fixture
def treadle_sqlite_url(treadle_sqlite_template: str, tmp_path: Path) -> str:
    """The URL of a fresh, migrated SQLite file of this test's own (in ``tmp_path``)."""
    from treadle.testing.databases import sqlite_database

    return sqlite_database(tmp_path, template=treadle_sqlite_template)


@pytest.fixture(scope="session")
def treadle_postgres_template() -> Iterator[str]:
    """The URL of a migrated PostgreSQL database, made once per session, dropped at its
    end; copy it, never connect to it (``CREATE DATABASE ... TEMPLATE`` needs it idle)."""
    from treadle.testing.databases import postgres_database

    with postgres_database(migrate=True, prefix="treadle_tpl") as url:
        yield url


@pytest.fixture
def treadle_postgres_url(treadle_postgres_template: str) -> Iterator[str]:
    """The URL of a fresh, migrated PostgreSQL database of this test's own, dropped
    after it. Skips without a server, fails instead under ``TREADLE_REQUIRE_POSTGRES=1``."""
    from treadle.testing.databases import postgres_database

    with postgres_database(template=treadle_postgres_template) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def treadle_database_url(request: pytest.FixtureRequest) -> str:
    """Each SQL dialect in turn: ``treadle_sqlite_url``, then ``treadle_postgres_url``."""
    return str(request.getfixturevalue(f"treadle_{request.param}_url"))
