"""Scenario fixtures: ``url``, each backend in turn, for the tests that run a scenario
through ``Engine.open`` on memory, a SQLite file and PostgreSQL; ``clock`` and
``engine``, that backend opened with the test module's ``WORKFLOWS`` on a ``FakeClock``.
The polling helpers for tests running a worker are in ``helpers``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from treadle import Engine
from treadle.testing import FakeClock
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


@pytest.fixture
def clock(fake_clock: FakeClock) -> FakeClock:
    """The ``engine``'s clock (the plugin's ``fake_clock``): a test moves it to fire the
    timers of sleeps and backoffs of hours."""
    return fake_clock


@pytest.fixture
async def engine(
    request: pytest.FixtureRequest, url: str, clock: FakeClock
) -> AsyncIterator[Engine]:
    """``Engine.open(url)`` registering the module's ``WORKFLOWS``, closed after the
    test. Modules reset their step counters in an autouse fixture, which runs first."""
    workflows = getattr(request.module, "WORKFLOWS", None)
    if workflows is None:
        pytest.fail(f"{request.module.__name__} uses the engine fixture without WORKFLOWS")
    async with await Engine.open(url, workflows=workflows, clock=clock) as opened:
        yield opened
