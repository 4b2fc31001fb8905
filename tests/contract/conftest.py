"""Contract-suite fixtures: one ``backend`` fixture parametrised over every adapter.

Each entry of ``BACKENDS`` builds a fresh, isolated ``Backend`` (persistence,
job transport and blob store that share transactions). The SQL adapters join
the suites by adding their factories here; the assertions stay the same.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from treadle.adapters.memory import InMemoryBlobStore, InMemoryJobTransport, InMemoryPersistence


@dataclass
class Backend:
    name: str
    persistence: Any
    job_transport: Any
    blob_store: Any
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()


async def memory_backend(tmp_path: Any) -> Backend:
    persistence = InMemoryPersistence()
    return Backend("memory", persistence, InMemoryJobTransport(persistence), InMemoryBlobStore())


# -- SQL backends ------------------------------------------------------------------
# Both start from a migrated template (one ``migrate()`` per test session and dialect),
# copied per test: every test gets its own fresh, fully migrated database in ~50 ms.

POSTGRES_URL = os.environ.get(
    "TREADLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
_templates: dict[str, str] = {}


def _require_postgres() -> bool:
    return os.environ.get("TREADLE_REQUIRE_POSTGRES", "") not in ("", "0", "false")


def _skip_or_fail_without_postgres(reason: str) -> None:
    """As ``tests/conftest.py``'s helper (not importable under importlib mode)."""
    if _require_postgres():
        pytest.fail(f"PostgreSQL is required (TREADLE_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(f"PostgreSQL not reachable: {reason}")


def _sqlite_template() -> Path:
    from treadle.adapters.sql import migrate

    if "sqlite" not in _templates:
        directory = Path(tempfile.mkdtemp(prefix="treadle-sqlite-template-"))
        atexit.register(shutil.rmtree, directory, True)
        path = directory / "template.db"
        migrate(f"sqlite:///{path}")
        _templates["sqlite"] = str(path)
    return Path(_templates["sqlite"])


async def sqlite_backend(tmp_path: Any) -> Backend:
    from treadle.adapters.filesystem import FileSystemBlobStore
    from treadle.adapters.sql import SqlJobTransport, SqlPersistence

    path = Path(tmp_path) / "treadle.db"
    shutil.copyfile(_sqlite_template(), path)
    persistence = await SqlPersistence.open(f"sqlite:///{path}")
    blobs = FileSystemBlobStore(Path(tmp_path) / "blobs")
    backend = Backend("sqlite", persistence, SqlJobTransport(persistence), blobs)
    backend.closers.append(persistence.close)
    return backend


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


def _pg_url(database: str) -> str:
    from treadle.adapters.sql import async_url

    return async_url(POSTGRES_URL).set(database=database).render_as_string(hide_password=False)


def _pg_template() -> str:
    from treadle.adapters.sql import migrate

    if "postgres" not in _templates:
        name = f"treadle_tpl_{uuid.uuid4().hex[:12]}"
        with _pg_admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        atexit.register(_pg_drop, name)
        migrate(_pg_url(name))
        _templates["postgres"] = name
    return _templates["postgres"]


def _pg_drop(name: str) -> None:
    with contextlib.suppress(Exception), _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def postgres_backend(tmp_path: Any) -> Backend:
    from treadle.adapters.sql import SqlBlobStore, SqlJobTransport, SqlPersistence

    template = _pg_template()
    name = f"treadle_t_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    persistence = await SqlPersistence.open(_pg_url(name))
    backend = Backend(
        "postgres", persistence, SqlJobTransport(persistence), SqlBlobStore(persistence)
    )

    async def drop() -> None:
        await persistence.close()
        _pg_drop(name)

    backend.closers.append(drop)
    return backend


BACKENDS: dict[str, Callable[[Any], Awaitable[Backend]]] = {
    "memory": memory_backend,
    "sqlite": sqlite_backend,
    "postgres": postgres_backend,
}


@pytest.fixture(params=list(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Backend]:
    made = await BACKENDS[request.param](tmp_path)
    try:
        yield made
    finally:
        await made.close()


# -- blob stores ---------------------------------------------------------------------
# The ``backend`` pairing covers memory, filesystem (beside SQLite) and the SQL table on
# PostgreSQL; ``blob_store`` runs every BlobStore adapter, the SQL table on both dialects.


async def _memory_blobs(tmp_path: Any) -> Backend:
    return await memory_backend(tmp_path)


async def _filesystem_blobs(tmp_path: Any) -> Backend:
    from treadle.adapters.filesystem import FileSystemBlobStore

    made = await memory_backend(tmp_path)
    made.blob_store = FileSystemBlobStore(Path(tmp_path) / "blobs")
    return made


async def _sql_sqlite_blobs(tmp_path: Any) -> Backend:
    from treadle.adapters.sql import SqlBlobStore

    made = await sqlite_backend(tmp_path)
    made.blob_store = SqlBlobStore(made.persistence)
    return made


async def _sql_postgres_blobs(tmp_path: Any) -> Backend:
    return await postgres_backend(tmp_path)


BLOB_STORES: dict[str, Callable[[Any], Awaitable[Backend]]] = {
    "memory": _memory_blobs,
    "filesystem": _filesystem_blobs,
    "sql-sqlite": _sql_sqlite_blobs,
    "sql-postgres": _sql_postgres_blobs,
}


@pytest.fixture(params=list(BLOB_STORES))
async def blob_store(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    made = await BLOB_STORES[request.param](tmp_path)
    try:
        yield made.blob_store
    finally:
        await made.close()
