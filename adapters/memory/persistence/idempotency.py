"""Idempotency records in the in-memory adapter: the ``Idempotency`` concern of one
``InMemoryTransaction``."""

from __future__ import annotations

import marshal
from collections.abc import Sequence
from datetime import datetime

from treadle.adapters.memory.persistence.shared import _MISSING, MemoryUnit, _idempotency_record
from treadle.kernel.model import (
    IdempotencyRecord,
    IdempotencyState,
)

_IDEMPOTENCY_COMPLETED = IdempotencyState.COMPLETED


class MemoryIdempotency:
    """Idempotency records on this transaction's store (``tx.idempotency``)."""

    __slots__ = ("_s", "_tx", "_undo")

    def __init__(self, tx: MemoryUnit) -> None:
        self._tx = tx
        self._s = tx._s
        self._undo = tx._undo

    async def get(self, key: str, command_type: str) -> IdempotencyRecord | None:
        return _idempotency_record(self._s.idempotency.get((key, command_type)))

    async def put(self, record: IdempotencyRecord) -> None:
        if not self._tx.active:
            self._tx._check()
        stored: IdempotencyRecord | tuple[str, str, datetime, bytes] = record
        if record.state is _IDEMPOTENCY_COMPLETED:
            result = marshal.dumps(record.result)
            stored = (record.key, record.command_type, record.started_at, result)
        idempotency, key = self._s.idempotency, (record.key, record.command_type)
        self._undo.append((idempotency, key, idempotency.get(key, _MISSING)))  # set_item
        idempotency[key] = stored

    async def put_many(self, records: Sequence[IdempotencyRecord]) -> None:
        self._tx._check()
        for record in records:
            await self.put(record)

    async def delete(self, key: str, command_type: str) -> None:
        self._tx._check()
        self._tx.del_item(self._s.idempotency, (key, command_type))
