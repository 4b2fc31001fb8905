"""Fresh databases for tests: a SQLite file or a PostgreSQL database per test.

``postgres_database()`` creates a uniquely named database on the server named by
``TREADLE_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``,
any database the role may connect to), yields its URL and drops it afterwards. Pass
``template=`` (the URL of a migrated database, see ``migrate=True``) to copy it: a
``CREATE DATABASE ... TEMPLATE`` takes ~50 ms where a ``migrate()`` takes seconds.

Where no server is reachable (or psycopg is not installed) the test is skipped with the
reason, unless ``TREADLE_REQUIRE_POSTGRES=1`` turns the skip into a failure — set it in
CI, where PostgreSQL must really be tested.

``sqlite_database()`` is the SQLite equivalent: a file in a directory of the caller's
(pytest's ``tmp_path``), empty, migrated or copied from a migrated template file.

Every import of SQLAlchemy, psycopg and pytest happens inside the functions: importing
this module costs nothing and needs none of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import psycopg

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
"""The server tests use when ``TREADLE_TEST_POSTGRES_URL`` is not set."""


def postgres_server_url() -> str:
    """The URL of the test server: ``TREADLE_TEST_POSTGRES_URL`` or the default."""
    return os.environ.get("TREADLE_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


def postgres_required() -> bool:
    """True where ``TREADLE_REQUIRE_POSTGRES`` is set (to anything but ``0``/``false``)."""
    return os.environ.get("TREADLE_REQUIRE_POSTGRES", "").strip().lower() not in (
        "",
        "0",
        "false",
    )


def skip_or_fail_without_postgres(reason: str) -> NoReturn:
    """Skip the running test, or fail it under ``TREADLE_REQUIRE_POSTGRES=1``."""
    import pytest

    if postgres_required():
        pytest.fail(f"PostgreSQL is required (TREADLE_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(f"PostgreSQL not reachable: {reason}")


def postgres_admin(server_url: str | None = None) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit psycopg connection to the server's maintenance database (the one
    the server URL names), for DBA actions: ``with postgres_admin() as admin: ...``.

    Skips or fails the test (see ``skip_or_fail_without_postgres``) where psycopg is
    missing or the server does not answer within 3 s.
    """
    try:
        import psycopg
    except ImportError as exc:  # the ``postgres`` extra is not installed
        skip_or_fail_without_postgres(f"psycopg is not installed ({exc})")
    from treadle.adapters.sql import sync_url

    url = sync_url(server_url or postgres_server_url()).set(drivername="postgresql")
    try:
        return psycopg.connect(
            url.render_as_string(hide_password=False), autocommit=True, connect_timeout=3
        )
    except psycopg.OperationalError as exc:
        skip_or_fail_without_postgres(str(exc).strip() or repr(exc))


def postgres_url(database: str, server_url: str | None = None) -> str:
    """The async (``postgresql+psycopg``) URL of ``database`` on the test server."""
    from treadle.adapters.sql import async_url

    url = async_url(server_url or postgres_server_url()).set(database=database)
    return url.render_as_string(hide_password=False)


def drop_postgres_database(database: str, server_url: str | None = None) -> None:
    """``DROP DATABASE ... WITH (FORCE)``; never raises (cleanup must not mask a failure)."""
    with contextlib.suppress(Exception), postgres_admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@contextlib.contextmanager
def postgres_database(
    *,
    template: str | None = None,
    migrate: bool = False,
    prefix: str = "treadle_t",
    server_url: str | None = None,
) -> Iterator[str]:
    """A new PostgreSQL database for the ``with`` block; yields its URL, drops it after.

    ``template``: the URL (or name) of a database to copy — typically one made with
    ``migrate=True``, which no one else may be connected to while it is copied.
    ``migrate``: run the Treadle migrations on the new database before yielding.
    ``prefix``: the start of the generated name (the rest is random), to tell a
    suite's leftovers apart on a shared server.
    """
    if not prefix.replace("_", "").isalnum() or len(prefix) > 40:
        raise ValueError(f"prefix: {prefix!r} must be letters, digits and _ (at most 40)")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = ""
    if template is not None:
        from sqlalchemy.engine import make_url

        source = make_url(template).database if "://" in template else template
        if not source or '"' in source:
            raise ValueError(f"template: {template!r} names no database")
        clause = f' TEMPLATE "{source}"'
    with postgres_admin(server_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}"{clause}')
    try:
        url = postgres_url(name, server_url)
        if migrate:
            from treadle.adapters.sql import migrate as run_migrations

            run_migrations(url)
        yield url
    finally:
        drop_postgres_database(name, server_url)


def sqlite_database(
    directory: str | os.PathLike[str],
    *,
    template: str | os.PathLike[str] | None = None,
    migrate: bool = False,
    name: str = "treadle.db",
) -> str:
    """The URL of a SQLite file ``directory/name``: empty (nothing is created until it
    is opened), migrated (``migrate=True``) or a copy of the ``template`` file or URL.
    The caller owns the directory (pytest's ``tmp_path`` removes it)."""
    path = Path(directory) / name
    if template is not None:
        source = str(template).removeprefix("sqlite:///")
        shutil.copyfile(source, path)
    url = f"sqlite:///{path}"
    if migrate:
        from treadle.adapters.sql import migrate as run_migrations

        run_migrations(url)
    return url
