"""Stage log lines in the SQL adapter: the ``Logs`` concern of one
``SqlTransaction``."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.persistence.shared import SqlUnit
from treadle.kernel.model import (
    LogRecord,
)


class SqlLogs:
    """Log lines on this transaction's connection (``tx.logs``, the ``LogStore`` port)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlUnit) -> None:
        self._tx = tx

    async def append(self, logs: Sequence[LogRecord]) -> None:
        self._tx._check()
        if not logs:
            return
        rows = [
            {
                "run_id": log.workflow_run_id,
                "stage_id": log.stage_id,
                "level": log.level,
                "message": log.message,
                "fields": log.fields,
                "timestamp": log.timestamp,
            }
            for log in logs
        ]
        await self._tx.execute(sa.insert(t.logs).values(rows), "append logs")

    async def for_run(self, run_id: str) -> list[LogRecord]:
        query = sa.select(t.logs).where(t.logs.c.run_id == run_id).order_by(t.logs.c.id)
        return [
            LogRecord(
                workflow_run_id=row.run_id,
                stage_id=row.stage_id,
                level=row.level,
                message=row.message,
                fields=row.fields,
                timestamp=row.timestamp,
            )
            for row in await self._tx.execute(query, "get logs")
        ]
