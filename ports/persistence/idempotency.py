"""The idempotency concern of the Persistence port: per-command idempotency records
(a replayed key returns the cached result; one still executing is marked in progress)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from treadle.kernel.model import IdempotencyRecord


class IdempotencyStore(Protocol):
    """Idempotency records, as seen by one unit of work (``tx.idempotency``)."""

    async def get(self, key: str, command_type: str) -> IdempotencyRecord | None:
        """The record of (key, command_type), if any."""

    async def put(self, record: IdempotencyRecord) -> None:
        """Insert or replace the record for (key, command_type)."""

    async def put_many(self, records: Sequence[IdempotencyRecord]) -> None:
        """``put`` for each, in order (a later record of the same key wins)."""

    async def delete(self, key: str, command_type: str) -> None:
        """Forget the record of (key, command_type), if any."""
