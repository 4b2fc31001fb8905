"""Payload offload: JSON values above ``payload_max_bytes`` live in the BlobStore.

Run input and output, stage output, suspended and resume state, outbox events
and cached command results are JSON columns. A value whose compact JSON
encoding is larger than the threshold is written to the BlobStore under
``payloads/<run id>/<sha256>`` and the column keeps a small reference,
``{"__treadle_blob__": key, "size": n}``; reads replace the reference with the
value again, so nothing above the adapter ever sees one.

Atomicity, the rule that matters: a rolled-back transaction must not leave
data behind.

* When the BlobStore is the ``blobs`` table of the same database
  (``SqlBlobStore``, the PostgreSQL default), the blob row is written on the
  transaction's own connection and commits or rolls back with the row that
  references it.
* Any other store (the filesystem beside a SQLite file, S3) cannot join the
  transaction. Its blobs are written before the referencing row; the
  transaction remembers the keys it created and deletes them if it rolls
  back. Only a crash between the put and the commit can leave an orphan,
  which nothing references (keys are content-addressed, so the blob is
  never half-referenced and a retry reuses it).

Keys are content-addressed per run, so rewriting an unchanged value (every
``update_run`` writes the input again) reuses the blob instead of copying it;
within one transaction a value read back from a reference is recognised by
identity and not even re-encoded.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from treadle.adapters.sql import schema as t
from treadle.kernel.errors import StorageError

if TYPE_CHECKING:
    from treadle.adapters.sql.persistence import SqlTransaction
    from treadle.ports import BlobStore

PAYLOAD_REF = "__treadle_blob__"
DEFAULT_PAYLOAD_MAX_BYTES = 256 * 1024
"""Default threshold: 256 KiB of compact JSON. Smaller values stay inline (JSONB)."""

_SCALARS = (bool, int, float)


def is_ref(value: Any) -> bool:
    """Whether a stored JSON value is an offload reference."""
    return type(value) is dict and PAYLOAD_REF in value and len(value) == 2


def encode(value: Any) -> bytes:
    """The compact JSON bytes the threshold is measured on (and the blob holds)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def check_threshold(max_bytes: int | None) -> int | None:
    given: object = max_bytes  # checked at runtime: comes from configuration
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ValueError(f"payload_max_bytes must be a positive integer or None, got {given!r}")
    return given


class PayloadOffload:
    """Offloads large JSON values of one ``SqlPersistence`` to ``store``.

    ``max_bytes=None`` never offloads but still reads references written earlier
    (a threshold can be raised or removed without losing data). ``same_database``
    means ``store`` is the ``blobs`` table this persistence writes to.
    """

    def __init__(self, store: BlobStore, max_bytes: int | None, *, same_database: bool) -> None:
        self.store = store
        self.max_bytes = check_threshold(max_bytes)
        self.same_database = same_database

    def key_for(self, scope: str | None, data: bytes) -> str:
        return f"payloads/{scope or '-'}/{hashlib.sha256(data).hexdigest()}"

    async def store_value(self, tx: SqlTransaction, scope: str | None, value: Any) -> Any:
        """What the column stores for ``value``: the value itself or a reference."""
        if self.max_bytes is None or value is None or isinstance(value, _SCALARS):
            return value
        data = encode(value)
        if len(data) <= self.max_bytes:
            return value
        key = self.key_for(scope, data)
        if self.same_database:
            stmt = (
                tx.insert(t.blobs)
                .values(key=key, data=data, size=len(data), updated_at=datetime.now(UTC))
                .on_conflict_do_nothing()
            )
            await tx.execute(stmt, f"offload payload {key!r}")
        elif not await self.store.has(key):
            await self.store.put(key, data)
            tx.created_blobs.append(key)
        return {PAYLOAD_REF: key, "size": len(data)}

    async def load_value(self, tx: SqlTransaction, ref: dict[str, Any]) -> Any:
        """The value a reference points to."""
        key = ref[PAYLOAD_REF]
        if self.same_database:
            row = (
                await tx.execute(sa.select(t.blobs.c.data).where(t.blobs.c.key == key), "load")
            ).first()
            if row is None:
                raise StorageError(f"offloaded payload {key!r} is missing from the blobs table")
            data = bytes(row.data)
        else:
            try:
                data = await self.store.get(key)
            except KeyError as exc:
                raise StorageError(
                    f"offloaded payload {key!r} is missing from the blob store"
                ) from exc
        return json.loads(data)

    async def discard(self, keys: list[str]) -> None:
        """Delete the blobs a rolled-back transaction created (best effort)."""
        for key in keys:
            try:
                await self.store.delete(key)
            except Exception:  # an orphan blob is harmless; the rollback must not fail
                continue
