"""Stage log lines in the in-memory adapter: the ``Logs`` concern of one
``InMemoryTransaction``."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from treadle.adapters.memory.persistence.shared import MemoryUnit, _drop_last
from treadle.kernel.model import (
    LogRecord,
)


class MemoryLogs:
    """Log lines on this transaction's store (``tx.logs``, the ``LogStore`` port)."""

    __slots__ = ("_s", "_tx", "_undo")

    def __init__(self, tx: MemoryUnit) -> None:
        self._tx = tx
        self._s = tx._s
        self._undo = tx._undo

    async def append(self, logs: Sequence[LogRecord]) -> None:
        self._tx._check()
        for log in logs:
            bucket = self._s.logs.setdefault(log.workflow_run_id, [])
            bucket.append(log)
            self._tx.on_rollback(functools.partial(_drop_last, bucket))

    async def for_run(self, run_id: str) -> list[LogRecord]:
        return list(self._s.logs.get(run_id, []))
