"""SQL BlobStore: artifacts and offloaded payloads in the ``blobs`` table.

For deployments whose only shared storage is the database (several workers on
PostgreSQL, no S3). Each call is its own short transaction: blobs are written
before the state change that references them, and an orphan blob is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.persistence import SqlPersistence
from treadle.adapters.sql.retention import under_prefix


class SqlBlobStore:
    """The BlobStore port on the database behind ``persistence``."""

    def __init__(self, persistence: SqlPersistence) -> None:
        self.persistence = persistence

    async def put(self, key: str, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"blob {key!r}: data must be bytes, got {type(data).__name__}")
        payload = bytes(data)
        values = {
            "key": key,
            "data": payload,
            "size": len(payload),
            "updated_at": datetime.now(UTC),
        }
        async with self.persistence.transaction() as tx:
            stmt = (
                tx.dialect.insert(t.blobs)
                .values(values)
                .on_conflict_do_update(
                    index_elements=["key"],
                    set_={k: values[k] for k in ("data", "size", "updated_at")},
                )
            )
            await tx.execute(stmt, f"put blob {key!r}")

    async def get(self, key: str) -> bytes:
        async with self.persistence.transaction(read_only=True) as tx:
            result = await tx.execute(
                sa.select(t.blobs.c.data).where(t.blobs.c.key == key), f"get blob {key!r}"
            )
            row = result.first()
        if row is None:
            raise KeyError(f"no blob with key {key!r}")
        return bytes(row.data)

    async def has(self, key: str) -> bool:
        async with self.persistence.transaction(read_only=True) as tx:
            result = await tx.execute(sa.select(t.blobs.c.key).where(t.blobs.c.key == key))
            return result.first() is not None

    async def delete(self, key: str) -> bool:
        async with self.persistence.transaction() as tx:
            result = await tx.execute(
                sa.delete(t.blobs).where(t.blobs.c.key == key), f"delete blob {key!r}"
            )
            return bool(result.rowcount)

    async def delete_prefixes(self, prefixes: Sequence[str]) -> int:
        """Delete every blob under any of ``prefixes`` in one statement (``BlobRetention``:
        retention deletes a batch of runs' artifacts so); returns how many."""
        wanted = [prefix for prefix in prefixes if prefix]
        if not wanted:
            return 0
        condition = sa.or_(*(under_prefix(t.blobs.c.key, prefix) for prefix in wanted))
        async with self.persistence.transaction() as tx:
            result = await tx.execute(sa.delete(t.blobs).where(condition), "delete blobs")
            return int(result.rowcount)

    async def list(self, prefix: str = "") -> list[str]:
        query = sa.select(t.blobs.c.key)
        if prefix:
            # substr, not LIKE: exact and case-sensitive on both dialects, no escaping.
            query = query.where(sa.func.substr(t.blobs.c.key, 1, len(prefix)) == prefix)
        async with self.persistence.transaction(read_only=True) as tx:
            keys = [key for (key,) in await tx.execute(query, "list blobs")]
        return sorted(keys)
