"""Idempotency records in the SQL adapter: the ``Idempotency`` concern of one
``SqlTransaction``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.sql.dialect import SetWrite
from treadle.adapters.sql.persistence.shared import SqlUnit
from treadle.kernel.model import (
    IdempotencyRecord,
    IdempotencyState,
)

_IDEMPOTENCY_FIELDS = ("key", "command_type", "state", "result", "started_at")


_PG_IDEMPOTENCY_ROWS = pg_bulk.RecordSet(
    t.idempotency_keys, {name: name for name in _IDEMPOTENCY_FIELDS}
)


_PG_PUT_IDEMPOTENCY = pg_bulk.insert_select(
    t.idempotency_keys,
    _PG_IDEMPOTENCY_ROWS,
    {name: _PG_IDEMPOTENCY_ROWS.value(name) for name in _IDEMPOTENCY_FIELDS},
    order_by="key",
    suffix="ON CONFLICT (key, command_type) DO UPDATE SET state = excluded.state, "
    "result = excluded.result, started_at = excluded.started_at",
)


_GET_IDEMPOTENCY = sa.select(t.idempotency_keys).where(
    t.idempotency_keys.c.key == sa.bindparam("key"),
    t.idempotency_keys.c.command_type == sa.bindparam("command_type"),
)


def _put_idempotency_statement(tx: SqlUnit) -> Any:
    ins = tx.dialect.insert(t.idempotency_keys)
    return ins.on_conflict_do_update(
        index_elements=["key", "command_type"],
        set_={k: ins.excluded[k] for k in ("state", "result", "started_at")},
    )


def _by_key(row: Mapping[str, Any]) -> tuple[str, str]:
    # Key order: two transactions upserting the same keys lock them alike.
    return (row["key"], row["command_type"])


_PUT_MANY = SetWrite(
    "put_idempotency",
    _PG_PUT_IDEMPOTENCY,
    _PG_IDEMPOTENCY_ROWS,
    order=_by_key,
    sqlite_build=_put_idempotency_statement,
)


class SqlIdempotency:
    """Idempotency records on this transaction's connection (``tx.idempotency``)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlUnit) -> None:
        self._tx = tx

    async def get(self, key: str, command_type: str) -> IdempotencyRecord | None:
        params = {"key": key, "command_type": command_type}
        row = (await self._tx.execute(_GET_IDEMPOTENCY, "get idempotency", params)).first()
        if row is None:
            return None
        return IdempotencyRecord(
            key=row.key,
            command_type=row.command_type,
            state=IdempotencyState(row.state),
            result=await self._tx._get_payload(row.result, None),
            started_at=row.started_at,
        )

    async def put(self, record: IdempotencyRecord) -> None:
        values = {
            "key": record.key,
            "command_type": record.command_type,
            "state": record.state.value,
            "result": await self._tx._put_payload(None, record.result),
            "started_at": record.started_at,
        }
        stmt = self._tx.prepared("put_idempotency", _put_idempotency_statement)
        await self._tx.execute(stmt, "put idempotency", values)

    async def put_many(self, records: Sequence[IdempotencyRecord]) -> None:
        self._tx._check()
        # The last record of a key wins, as with successive put_idempotency calls (and a
        # multi-row upsert may not touch one row twice).
        latest = {(r.key, r.command_type): r for r in records}
        if not latest:
            return
        rows = [
            {
                "key": record.key,
                "command_type": record.command_type,
                "state": record.state.value,
                "result": await self._tx._put_payload(None, record.result),
                "started_at": record.started_at,
            }
            for record in latest.values()
        ]
        await self._tx.dialect.write_many(self._tx, _PUT_MANY, rows, "put idempotency")

    async def delete(self, key: str, command_type: str) -> None:
        c = t.idempotency_keys.c
        stmt = sa.delete(t.idempotency_keys).where(c.key == key, c.command_type == command_type)
        await self._tx.execute(stmt, "delete idempotency")
