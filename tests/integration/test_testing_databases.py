"""treadle.testing.databases and the plugin's database fixtures: a fresh, isolated
database per test on SQLite and PostgreSQL, and the skip that CI turns into a failure."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa

from treadle.testing.databases import (
    postgres_admin,
    postgres_database,
    postgres_required,
    sqlite_database,
)

NO_SERVER = "postgresql+psycopg://postgres@127.0.0.1:1/test"
"""A URL nothing listens on: connecting is refused at once."""


def _tables(url: str) -> set[str]:
    from treadle.adapters.sql import sync_url

    engine = sa.create_engine(sync_url(url))
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _databases() -> set[str]:
    with postgres_admin() as admin:
        return {str(row[0]) for row in admin.execute("SELECT datname FROM pg_database")}


def _add_marker_table(url: str) -> None:
    from treadle.adapters.sql import sync_url

    engine = sa.create_engine(sync_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE marker (id INTEGER)"))
    finally:
        engine.dispose()


# -- skip or fail without a server -------------------------------------------------------


@pytest.mark.parametrize("flag", ["", "0", "false"])
def test_without_a_server_the_test_is_skipped(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREADLE_TEST_POSTGRES_URL", NO_SERVER)
    monkeypatch.setenv("TREADLE_REQUIRE_POSTGRES", flag)
    assert not postgres_required()
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL not reachable"):  # noqa: SIM117
        with postgres_database():
            raise AssertionError("a database was made without a server")


@pytest.mark.parametrize("flag", ["1", "true", "yes"])
def test_require_postgres_turns_the_skip_into_a_failure(
    flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TREADLE_TEST_POSTGRES_URL", NO_SERVER)
    monkeypatch.setenv("TREADLE_REQUIRE_POSTGRES", flag)
    assert postgres_required()
    with pytest.raises(pytest.fail.Exception, match=r"required \(TREADLE_REQUIRE_POSTGRES=1\)"):  # noqa: SIM117
        with postgres_database():
            raise AssertionError("a database was made without a server")


def test_a_missing_psycopg_skips_or_fails_like_a_missing_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # ``import psycopg`` raises ImportError
    monkeypatch.delenv("TREADLE_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="psycopg is not installed"):
        postgres_admin()
    monkeypatch.setenv("TREADLE_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="psycopg is not installed"):
        postgres_admin()


@pytest.mark.parametrize(("flag", "outcome"), [("", "1 skipped"), ("1", "1 error")])
def test_plugin_fixture_skips_or_errors_in_a_users_suite(
    flag: str, outcome: str, tmp_path: Path
) -> None:
    """A user's own suite (the installed plugin, nothing of Treadle's conftests): without
    a server ``treadle_postgres_url`` skips the test; under the flag its setup fails."""
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            def test_needs_postgres(treadle_postgres_url):
                raise AssertionError("ran without a server")
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("COV_CORE_")}  # no coverage
    env |= {"TREADLE_TEST_POSTGRES_URL": NO_SERVER, "TREADLE_REQUIRE_POSTGRES": flag}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert outcome in done.stdout, done.stdout + done.stderr
    expected = "PostgreSQL is required" if flag else "PostgreSQL not reachable"
    assert expected in done.stdout, done.stdout


def test_importing_the_module_loads_no_driver() -> None:
    code = (
        "import sys, treadle.testing.databases\n"
        "bad = [m for m in ('psycopg', 'sqlalchemy', 'pytest', 'treadle.adapters') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- postgres_database ---------------------------------------------------------------------


def test_postgres_database_is_new_empty_and_dropped_after() -> None:
    with postgres_database(prefix="treadle_probe") as one, postgres_database() as two:
        names = {sa.make_url(one).database, sa.make_url(two).database}
        assert len(names) == 2
        assert names <= _databases()
        assert sa.make_url(one).database.startswith("treadle_probe_")  # type: ignore[union-attr]
        assert sa.make_url(one).drivername == "postgresql+psycopg"
        assert _tables(one) == set()
    assert not names & _databases()


def test_postgres_database_from_a_migrated_template_is_a_private_copy() -> None:
    with postgres_database(migrate=True) as template:
        assert {"runs", "jobs", "treadle_alembic_version"} <= _tables(template)
        with (
            postgres_database(template=template) as first,
            postgres_database(template=template) as second,
        ):
            _add_marker_table(first)
            assert "marker" in _tables(first)
            assert "marker" not in _tables(second)
            assert _tables(second) == _tables(template)


def test_postgres_database_rejects_a_bad_prefix_or_template() -> None:
    with pytest.raises(ValueError, match="prefix"), postgres_database(prefix='x"; DROP'):
        pass
    with pytest.raises(ValueError, match="template"), postgres_database(template="sqlite://"):
        pass


# -- sqlite_database -----------------------------------------------------------------------


def test_sqlite_database_empty_migrated_or_copied(tmp_path: Path) -> None:
    empty = sqlite_database(tmp_path, name="empty.db")
    assert empty == f"sqlite:///{tmp_path / 'empty.db'}"
    assert not (tmp_path / "empty.db").exists()
    migrated = sqlite_database(tmp_path, migrate=True, name="migrated.db")
    assert {"runs", "jobs", "treadle_alembic_version"} <= _tables(migrated)
    copy = sqlite_database(tmp_path, template=migrated, name="copy.db")
    _add_marker_table(copy)
    assert "marker" not in _tables(migrated)
    assert _tables(copy) == _tables(migrated) | {"marker"}


# -- the plugin's fixtures -----------------------------------------------------------------
SEEN: list[str] = []


@pytest.mark.parametrize("turn", [1, 2])
def test_treadle_database_url_is_migrated_and_private_to_each_test(
    turn: int, treadle_database_url: str
) -> None:
    """Both dialects, twice: each test gets a migrated database no other test wrote to."""
    assert treadle_database_url not in SEEN
    SEEN.append(treadle_database_url)
    tables = _tables(treadle_database_url)
    assert {"runs", "jobs", "treadle_alembic_version"} <= tables
    assert "marker" not in tables
    _add_marker_table(treadle_database_url)


async def test_treadle_fixtures_open_with_the_engine(
    treadle_sqlite_url: str, treadle_postgres_url: str
) -> None:
    """The URLs open directly (no ``auto_migrate``): PostgreSQL refuses unmigrated ones."""
    from treadle import Engine

    for url in (treadle_sqlite_url, treadle_postgres_url):
        async with await Engine.open(url) as engine:
            assert await engine.list() == []
