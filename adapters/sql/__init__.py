"""SQL adapters (SQLAlchemy 2 Core, asyncio) for PostgreSQL and SQLite.

``SqlPersistence`` and ``SqlJobTransport`` share one database and one
transaction per unit of work; ``SqlBlobStore`` keeps blobs and ``SqlScheduler``
scheduled commands in the same database; ``migrate(url)`` applies the shipped
Alembic migrations. Importing this package needs the ``sql`` extra
(SQLAlchemy, Alembic; aiosqlite only for a URL that names it) and opens nothing.
"""

from typing import TYPE_CHECKING

from treadle.adapters.sql.blob_store import SqlBlobStore
from treadle.adapters.sql.engine import async_url, create_engine, sync_url
from treadle.adapters.sql.job_transport import SqlJobTransport
from treadle.adapters.sql.listener import PgJobListener, backend_pids
from treadle.adapters.sql.migrate import (
    current_revision,
    head_revision,
    migrate,
    migrate_engine,
)
from treadle.adapters.sql.persistence import SqlPersistence, SqlTransaction
from treadle.adapters.sql.scheduler import SqlScheduler
from treadle.adapters.sql.workers import SqlWorkerRegistry

__all__ = [
    "PgJobListener",
    "SqlBlobStore",
    "SqlJobTransport",
    "SqlPersistence",
    "SqlScheduler",
    "SqlTransaction",
    "SqlWorkerRegistry",
    "async_url",
    "backend_pids",
    "create_engine",
    "current_revision",
    "head_revision",
    "migrate",
    "migrate_engine",
    "sync_url",
]

if TYPE_CHECKING:
    from treadle.adapters.filesystem import FileSystemBlobStore
    from treadle.ports import BlobStore, JobTransport, Persistence, Scheduler, Transaction
    from treadle.ports.wake_source import WakeSource

    def _conforms(
        persistence: SqlPersistence,
        tx: SqlTransaction,
        transport: SqlJobTransport,
        sql_blobs: SqlBlobStore,
        file_blobs: FileSystemBlobStore,
        listener: PgJobListener,
        scheduler: SqlScheduler,
    ) -> tuple[Persistence, Transaction, JobTransport, BlobStore, BlobStore, WakeSource, Scheduler]:
        """mypy proves the adapters satisfy the port protocols."""
        return persistence, tx, transport, sql_blobs, file_blobs, listener, scheduler
