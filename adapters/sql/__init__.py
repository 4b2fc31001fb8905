"""SQL adapters (SQLAlchemy 2 Core, asyncio) for PostgreSQL and SQLite.

``SqlPersistence`` and ``SqlJobTransport`` share one database and one
transaction per unit of work; ``SqlBlobStore`` keeps blobs in the same
database; ``migrate(url)`` applies the shipped Alembic migrations. Importing
this package needs the ``sql`` extra (SQLAlchemy, Alembic, aiosqlite) and opens
nothing.
"""

from typing import TYPE_CHECKING

from treadle.adapters.sql.blob_store import SqlBlobStore
from treadle.adapters.sql.engine import async_url, create_engine, sync_url
from treadle.adapters.sql.job_transport import SqlJobTransport
from treadle.adapters.sql.listener import PgJobListener
from treadle.adapters.sql.migrate import (
    current_revision,
    head_revision,
    migrate,
    migrate_engine,
)
from treadle.adapters.sql.persistence import SqlPersistence, SqlTransaction

__all__ = [
    "PgJobListener",
    "SqlBlobStore",
    "SqlJobTransport",
    "SqlPersistence",
    "SqlTransaction",
    "async_url",
    "create_engine",
    "current_revision",
    "head_revision",
    "migrate",
    "migrate_engine",
    "sync_url",
]

if TYPE_CHECKING:
    from treadle.adapters.filesystem import FileSystemBlobStore
    from treadle.ports import BlobStore, JobTransport, Persistence, Transaction
    from treadle.ports.wake_source import WakeSource

    def _conforms(
        persistence: SqlPersistence,
        tx: SqlTransaction,
        transport: SqlJobTransport,
        sql_blobs: SqlBlobStore,
        file_blobs: FileSystemBlobStore,
        listener: PgJobListener,
    ) -> tuple[Persistence, Transaction, JobTransport, BlobStore, BlobStore, WakeSource]:
        """mypy proves the adapters satisfy the port protocols."""
        return persistence, tx, transport, sql_blobs, file_blobs, listener
