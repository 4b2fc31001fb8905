"""pytest plugin: ``treadle_engine``, ``fake_clock`` and fresh-database fixtures.

Mark a test ``@pytest.mark.treadle(workflows=[pipeline])`` to pre-register
workflows, or call ``treadle_engine.register(pipeline)`` inside it.

An ``async def`` test that uses these fixtures (or the marker) runs under asyncio
with no configuration: with pytest-asyncio installed the plugin gives it
pytest-asyncio's ``asyncio`` marker, which in its default strict mode would
otherwise be missing and the test would fail with "async def functions are not
natively supported"; without pytest-asyncio the plugin runs the coroutine itself
with ``asyncio.run``. A test already marked ``asyncio`` (say with a ``loop_scope``)
or ``anyio`` is left to that plugin.

pytest imports this module (entry point ``pytest11``) before coverage starts, so
it imports Treadle itself only inside the fixtures; otherwise every module-level
line of the kernel would count as not covered.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

import pytest

if TYPE_CHECKING:
    from treadle.testing.clock import FakeClock
    from treadle.testing.engine import TestEngine


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "treadle(workflows=[...]): workflows the treadle_engine fixture registers"
    )


# The fixtures below (and the ``treadle`` marker) make an async test "ours" to run.
_FIXTURES = frozenset(
    {
        "fake_clock",
        "treadle_engine",
        "treadle_sqlite_url",
        "treadle_postgres_url",
        "treadle_database_url",
    }
)


def _runs_under_asyncio(item: object) -> TypeGuard[pytest.Function]:
    """An ``async def`` test using this plugin that no other async plugin was asked to run."""
    return (
        isinstance(item, pytest.Function)
        and inspect.iscoroutinefunction(item.obj)
        and (
            not _FIXTURES.isdisjoint(item.fixturenames)
            or item.get_closest_marker("treadle") is not None
        )
        and item.get_closest_marker("asyncio") is None
        and item.get_closest_marker("anyio") is None
    )


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, object, object]:
    """Mark our async tests ``asyncio`` as they are collected. pytest-asyncio turns a
    marked coroutine into its own item type in its wrapper of this same hook, so the
    marker must be there before that wrapper sees the items (``trylast`` makes this
    wrapper the inner one); marking later, in ``pytest_collection_modifyitems``, is
    too late."""
    result = yield
    if collector.config.pluginmanager.hasplugin("asyncio"):
        items = result if isinstance(result, list) else [result]
        for item in items:
            if _runs_under_asyncio(item):
                item.add_marker(pytest.mark.asyncio)
    return result


@pytest.hookimpl
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Without pytest-asyncio, run our async tests in a fresh event loop (pytest's own
    call, which would refuse them, comes after this hook, which it marks ``trylast``)."""
    if pyfuncitem.config.pluginmanager.hasplugin("asyncio"):
        return None
    if not _runs_under_asyncio(pyfuncitem):
        return None
    parameters = inspect.signature(pyfuncitem.obj).parameters
    arguments = {k: v for k, v in pyfuncitem.funcargs.items() if k in parameters}
    asyncio.run(pyfuncitem.obj(**arguments))
    return True


@pytest.fixture
def fake_clock() -> FakeClock:
    """A virtual clock at 2026-01-01T00:00Z that moves only when told to; the clock of
    ``treadle_engine`` when a test asks for both."""
    from treadle.testing.clock import FakeClock

    return FakeClock()


@pytest.fixture
def treadle_engine(request: pytest.FixtureRequest, fake_clock: FakeClock) -> TestEngine:
    """A fresh ``TestEngine`` per test, with the workflows of the ``treadle`` marker,
    running on ``fake_clock`` (one clock: ``advance_time`` moves what the test reads)."""
    from treadle.testing.engine import TestEngine

    marker = request.node.get_closest_marker("treadle")
    workflows = list(marker.kwargs.get("workflows", ())) if marker is not None else []
    return TestEngine(workflows, clock=fake_clock)


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
