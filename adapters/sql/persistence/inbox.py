"""Code-workflow inboxes (signals and updates) in the SQL adapter: the ``Inbox`` concern of one
``SqlTransaction``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.payloads import (
    is_encoded,
)
from treadle.adapters.sql.persistence.shared import SqlUnit
from treadle.kernel.errors import (
    ConcurrencyError,
    DuplicateError,
)
from treadle.kernel.model import (
    JsonValue,
    evolve,
)
from treadle.kernel.workflows.model import InboxMessage


def _inbox_from_row(row: sa.Row[Any]) -> InboxMessage:
    return InboxMessage(
        id=int(row.id),
        workflow_run_id=row.run_id,
        kind=row.kind,
        name=row.name,
        payload=row.payload,
        update_id=row.update_id,
        reply=row.reply,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
        consumed_at=row.consumed_at,
        consumed_by=row.consumed_by_step,
    )


class SqlInbox:
    """Signals and updates on this transaction's connection (``tx.inbox``)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlUnit) -> None:
        self._tx = tx

    async def _inbox_from(self, row: sa.Row[Any]) -> InboxMessage:
        message = _inbox_from_row(row)
        if is_encoded(message.payload) or is_encoded(message.reply):
            run_id = message.workflow_run_id
            loaded = {
                "payload": await self._tx._get_payload(message.payload, run_id),
                "reply": await self._tx._get_payload(message.reply, run_id),
            }
            message = evolve(message, loaded)
        return message

    async def insert(self, message: InboxMessage) -> InboxMessage:
        stmt = (
            self._tx.dialect.insert(t.signal_inbox)
            .values(
                run_id=message.workflow_run_id,
                kind=message.kind,
                name=message.name,
                payload=await self._tx._put_payload(message.workflow_run_id, message.payload),
                update_id=message.update_id,
                reply=await self._tx._put_payload(message.workflow_run_id, message.reply),
                idempotency_key=message.idempotency_key,
                created_at=message.created_at,
                consumed_at=message.consumed_at,
                consumed_by_step=message.consumed_by,
            )
            .on_conflict_do_nothing()
            .returning(t.signal_inbox.c.id)
        )
        row = (await self._tx.execute(stmt, "insert signal")).first()
        if row is None:
            raise DuplicateError(
                f"run {message.workflow_run_id!r} already received a message with key "
                f"{message.idempotency_key!r}"
            )
        return evolve(message, {"id": int(row[0])})

    async def next_message(
        self, run_id: str, name: str, *, kind: str = "signal"
    ) -> InboxMessage | None:
        c = t.signal_inbox.c
        query = (
            sa.select(t.signal_inbox)
            .where(
                c.run_id == run_id,
                c.name == name,
                c.kind == kind,
                c.consumed_at.is_(None),
            )
            .order_by(c.id)
            .limit(1)
        )
        row = (await self._tx.execute(query, "next signal")).first()
        return await self._inbox_from(row) if row is not None else None

    async def consume(self, message_id: int, consumed_at: datetime, consumed_by: str) -> None:
        c = t.signal_inbox.c
        stmt = (
            sa.update(t.signal_inbox)
            .where(c.id == message_id, c.consumed_at.is_(None))
            .values(consumed_at=consumed_at, consumed_by_step=consumed_by)
        )
        if (await self._tx.execute(stmt, "consume signal")).rowcount != 1:
            raise ConcurrencyError(f"inbox message {message_id} was consumed already")

    async def for_run(self, run_id: str) -> list[InboxMessage]:
        c = t.signal_inbox.c
        query = sa.select(t.signal_inbox).where(c.run_id == run_id).order_by(c.id)
        rows = await self._tx.execute(query, "list signals")
        return [await self._inbox_from(row) for row in rows]

    async def find_update(self, run_id: str, update_id: str) -> InboxMessage | None:
        c = t.signal_inbox.c
        query = sa.select(t.signal_inbox).where(
            c.run_id == run_id, c.kind == "update", c.update_id == update_id
        )
        row = (await self._tx.execute(query, "find update")).first()
        return await self._inbox_from(row) if row is not None else None

    async def set_reply(self, message_id: int, reply: JsonValue) -> None:
        c = t.signal_inbox.c
        stmt = (
            sa.update(t.signal_inbox)
            .where(c.id == message_id, c.reply.is_(None) | (sa.cast(c.reply, sa.Text) == "null"))
            .values(reply=await self._tx._put_payload(None, reply))
        )
        if (await self._tx.execute(stmt, "set reply")).rowcount != 1:
            raise ConcurrencyError(f"update message {message_id} was answered already")
