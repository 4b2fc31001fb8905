"""Contract-suite fixtures: one ``backend`` fixture parametrised over every adapter.

Each entry of ``BACKENDS`` builds a fresh, isolated ``Backend`` (persistence,
job transport and blob store that share transactions). The SQL adapters join
the suites by adding their factories here; the assertions stay the same.
"""

from __future__ import annotations

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

    async def aclose(self) -> None:
        for close in reversed(self.closers):
            await close()


async def memory_backend(request: pytest.FixtureRequest) -> Backend:
    persistence = InMemoryPersistence()
    return Backend("memory", persistence, InMemoryJobTransport(persistence), InMemoryBlobStore())


# -- SQL backends ------------------------------------------------------------------
# Both come from the treadle plugin's fixtures: a migrated template per test session and
# dialect, copied per test, so every test gets its own fresh, migrated database in ~50 ms.


async def sqlite_backend(request: pytest.FixtureRequest) -> Backend:
    from treadle.adapters.filesystem import FileSystemBlobStore
    from treadle.adapters.sql import SqlJobTransport, SqlPersistence

    persistence = await SqlPersistence.open(request.getfixturevalue("treadle_sqlite_url"))
    blobs = FileSystemBlobStore(Path(request.getfixturevalue("tmp_path")) / "blobs")
    backend = Backend("sqlite", persistence, SqlJobTransport(persistence), blobs)
    backend.closers.append(persistence.aclose)
    return backend


async def postgres_backend(request: pytest.FixtureRequest) -> Backend:
    from treadle.adapters.sql import SqlBlobStore, SqlJobTransport, SqlPersistence

    persistence = await SqlPersistence.open(request.getfixturevalue("treadle_postgres_url"))
    backend = Backend(
        "postgres", persistence, SqlJobTransport(persistence), SqlBlobStore(persistence)
    )
    backend.closers.append(persistence.aclose)
    return backend


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Awaitable[Backend]]] = {
    "memory": memory_backend,
    "sqlite": sqlite_backend,
    "postgres": postgres_backend,
}


@pytest.fixture(params=list(BACKENDS))
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    made = await BACKENDS[request.param](request)
    try:
        yield made
    finally:
        await made.aclose()


# -- blob stores ---------------------------------------------------------------------
# The ``backend`` pairing covers memory, filesystem (beside SQLite) and the SQL table on
# PostgreSQL; ``blob_store`` runs every BlobStore adapter, the SQL table on both dialects,
# and S3 on a moto server.


async def _filesystem_blobs(request: pytest.FixtureRequest) -> Backend:
    from treadle.adapters.filesystem import FileSystemBlobStore

    made = await memory_backend(request)
    made.blob_store = FileSystemBlobStore(Path(request.getfixturevalue("tmp_path")) / "blobs")
    return made


async def _sql_sqlite_blobs(request: pytest.FixtureRequest) -> Backend:
    from treadle.adapters.sql import SqlBlobStore

    made = await sqlite_backend(request)
    made.blob_store = SqlBlobStore(made.persistence)
    return made


async def _s3_blobs(request: pytest.FixtureRequest) -> Backend:
    """``S3BlobStore`` on a fresh bucket of the moto server (real HTTP, 127.0.0.1)."""
    made = await memory_backend(request)
    made.blob_store = request.getfixturevalue("s3_store")()
    return made


BLOB_STORES: dict[str, Callable[[pytest.FixtureRequest], Awaitable[Backend]]] = {
    "memory": memory_backend,
    "filesystem": _filesystem_blobs,
    "sql-sqlite": _sql_sqlite_blobs,
    "sql-postgres": postgres_backend,
    "s3": _s3_blobs,
}


@pytest.fixture(params=list(BLOB_STORES))
async def blob_store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    made = await BLOB_STORES[request.param](request)
    try:
        yield made.blob_store
    finally:
        await made.aclose()
