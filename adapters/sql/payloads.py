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

Telling a reference from user data, the rule that keeps runs apart. A reference is
a JSON object, and so is user data: a run input of ``{"__treadle_blob__": key,
"size": 1}`` must come back as itself, never as another run's payload or artifact.
So whether a stored value is a reference is never guessed from its shape. User
values are escaped at this boundary, always (offload on or off): an object with
either reserved key at its top level, ``__treadle_blob__`` or ``__treadle_value__``,
is stored as ``{"__treadle_value__": value}`` and unwrapped on read (and that
wrapper, if large, is what a blob holds). Only the adapter ever writes a top-level
``__treadle_blob__`` then. Escaping rather than a flag column beside each JSON
column: no migration of eight tables and the PostgreSQL set-oriented writes, and no
cost for the ordinary value but one ``type(v) is dict`` and two key lookups; the
reserved keys are documented (docs/storage.md). Nested objects are never
interpreted, so only the top level is escaped. (Rows written before escaping
existed cannot be told apart: a user object there of exactly the two keys of a
reference, naming a key under ``payloads/``, is still read as one.)

A reference whose blob is gone raises ``PayloadMissingError`` (named, never
retried). Reads of runs and stages, which serve claims, listings and group commits
of many runs, return a ``MissingPayload`` in the value's place instead; writing it
back stores the reference it was read from. The kernel fails the run or stage
that needs the value. An outbox event whose blob is gone is dead-lettered.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.kernel.errors import PayloadMissingError
from treadle.kernel.model import MissingPayload

if TYPE_CHECKING:
    from treadle.adapters.sql.dialect import SqlDialect
    from treadle.ports import BlobStore


class BlobRows(Protocol):
    """What offloading needs of a ``SqlTransaction``: its dialect (the INSERT construct),
    ``execute`` and the blobs it created (discarded on rollback). A protocol, so this
    module stays below ``persistence``, which imports it."""

    created_blobs: list[str]

    @property
    def dialect(self) -> SqlDialect: ...

    async def execute(
        self, statement: sa.Executable, what: str = "query", parameters: Any = None
    ) -> sa.CursorResult[*tuple[Any, ...]]: ...


PAYLOAD_REF = "__treadle_blob__"
"""The key of a reference, ``{PAYLOAD_REF: key, "size": n}``."""
ESCAPED = "__treadle_value__"
"""The key of an escaped user value, ``{ESCAPED: value}``."""
DEFAULT_PAYLOAD_MAX_BYTES = 256 * 1024
"""Default threshold: 256 KiB of compact JSON. Smaller values stay inline (JSONB)."""

_SCALARS = (bool, int, float)
_KEY_PREFIX = "payloads/"


def is_ref(value: Any) -> bool:
    """Whether a stored JSON value is an offload reference (a user value never is: see
    ``escape``). The key's prefix is checked too, for rows written before escaping: no
    reference of ours names anything outside ``payloads/`` (an artifact, say)."""
    if type(value) is not dict or len(value) != 2:
        return False
    key = value.get(PAYLOAD_REF)
    return type(key) is str and key.startswith(_KEY_PREFIX)


def is_encoded(value: Any) -> bool:
    """Whether a stored JSON value may be an encoding of this module (a reference or an
    escaped user value) rather than the value itself: the cheap test before decoding."""
    return type(value) is dict and (PAYLOAD_REF in value or ESCAPED in value)


def escape(value: Any) -> Any:
    """What a column stores for the user ``value`` before any offload: the value itself,
    or ``{ESCAPED: value}`` for an object with a reserved key at its top level.
    (``isinstance``: a dict subclass is stored as an object too.)"""
    if isinstance(value, dict) and (PAYLOAD_REF in value or ESCAPED in value):
        return {ESCAPED: value}
    return value


def unescape(value: Any) -> Any:
    """The user value ``escape`` stored as ``value`` (a read value, never a reference)."""
    if type(value) is dict and ESCAPED in value and len(value) == 1:
        return value[ESCAPED]
    return value


def reference_of(missing: MissingPayload) -> dict[str, Any]:
    """The reference a ``MissingPayload`` was read from, to store it again unchanged."""
    return {PAYLOAD_REF: missing.key, "size": missing.size}


def missing(ref: dict[str, Any], run_id: str | None) -> MissingPayload:
    """What a read returns for ``ref`` when its blob is gone."""
    size = ref.get("size")
    return MissingPayload(
        key=ref[PAYLOAD_REF], size=size if type(size) is int else None, run_id=run_id
    )


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""Made once: ``json.dumps`` with any non-default option builds a new encoder on every
call, which costs as much as encoding a small value (several calls per stage)."""


def encode(value: Any) -> bytes:
    """The compact JSON bytes the threshold is measured on (and the blob holds)."""
    return _COMPACT.encode(value).encode()


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

    @staticmethod
    def run_prefix(run_id: str) -> str:
        """The key prefix of every value offloaded for ``run_id`` (retention deletes it)."""
        return f"{_KEY_PREFIX}{run_id}/"

    def key_for(self, scope: str | None, data: bytes) -> str:
        return f"{_KEY_PREFIX}{scope or '-'}/{hashlib.sha256(data).hexdigest()}"

    def offloads(self, value: Any) -> bool:
        """Whether ``store_value`` would put ``value`` in the blob store (no I/O): a caller
        that must know before anything is stored (``append_events``) asks first."""
        if self.max_bytes is None or value is None or isinstance(value, _SCALARS):
            return False
        return len(encode(value)) > self.max_bytes

    async def store_value(self, tx: BlobRows, scope: str | None, value: Any) -> Any:
        """What the column stores for ``value``: the value itself or a reference."""
        if self.max_bytes is None or value is None or isinstance(value, _SCALARS):
            return value
        data = encode(value)
        if len(data) <= self.max_bytes:
            return value
        key = self.key_for(scope, data)
        if self.same_database:
            stmt = (
                tx.dialect.insert(t.blobs)
                .values(key=key, data=data, size=len(data), updated_at=datetime.now(UTC))
                .on_conflict_do_nothing()
            )
            await tx.execute(stmt, f"offload payload {key!r}")
        elif not await self.store.has(key):
            await self.store.put(key, data)
            tx.created_blobs.append(key)
        return {PAYLOAD_REF: key, "size": len(data)}

    async def load_value(self, tx: BlobRows, ref: dict[str, Any], run_id: str | None) -> Any:
        """The stored value a reference of ``run_id``'s points to (still escaped, as it was
        offloaded); ``PayloadMissingError`` when its blob is gone. Other failures of the
        store (a connection, a permission) propagate: waiting may heal those."""
        key = ref[PAYLOAD_REF]
        if self.same_database:
            row = (
                await tx.execute(sa.select(t.blobs.c.data).where(t.blobs.c.key == key), "load")
            ).first()
            if row is None:
                raise PayloadMissingError(run_id, key)
            data = bytes(row.data)
        else:
            try:
                data = await self.store.get(key)
            except KeyError as exc:
                raise PayloadMissingError(run_id, key) from exc
        return json.loads(data)

    async def discard(self, keys: list[str]) -> None:
        """Delete the blobs a rolled-back transaction created (best effort)."""
        for key in keys:
            try:
                await self.store.delete(key)
            except Exception:  # an orphan blob is harmless; the rollback must not fail
                continue
