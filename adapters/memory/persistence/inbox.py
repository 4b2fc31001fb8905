"""Code-workflow inboxes (signals and updates) in the in-memory adapter: the ``Inbox``
concern of one ``InMemoryTransaction``.
"""

from __future__ import annotations

import functools
from datetime import datetime

from treadle.adapters.memory.persistence.shared import MemoryUnit, _drop_last
from treadle.kernel.errors import ConcurrencyError, DuplicateError
from treadle.kernel.model import (
    JsonValue,
    evolve,
)
from treadle.kernel.workflows.model import InboxMessage


class MemoryInbox:
    """Signals and updates on this transaction's store (``tx.inbox``)."""

    __slots__ = ("_s", "_tx", "_undo")

    def __init__(self, tx: MemoryUnit) -> None:
        self._tx = tx
        self._s = tx._s
        self._undo = tx._undo

    async def insert(self, message: InboxMessage) -> InboxMessage:
        self._tx._check()
        s = self._s
        run_id = message.workflow_run_id
        if message.idempotency_key is not None:
            key = (run_id, message.idempotency_key)
            if key in s.inbox_keys:
                raise DuplicateError(
                    f"run {run_id!r} already received a message with key "
                    f"{message.idempotency_key!r}"
                )
        s.next_inbox_id += 1
        stored = evolve(message, {"id": s.next_inbox_id})
        self._tx.set_item(s.inbox, s.next_inbox_id, stored)
        if message.idempotency_key is not None:
            self._tx.set_item(s.inbox_keys, (run_id, message.idempotency_key), s.next_inbox_id)
        bucket = s.inbox_by_run.setdefault(run_id, [])
        bucket.append(s.next_inbox_id)
        self._tx.on_rollback(functools.partial(_drop_last, bucket))
        if stored.consumed_at is None:
            waiting = (run_id, stored.kind, stored.name)
            self._tx.set_item(s.unconsumed, waiting, (*s.unconsumed.get(waiting, ()), stored.id))
        return stored

    async def next_message(
        self, run_id: str, name: str, *, kind: str = "signal"
    ) -> InboxMessage | None:
        ids = self._s.unconsumed.get((run_id, kind, name))
        return self._s.inbox[ids[0]] if ids else None

    async def consume(self, message_id: int, consumed_at: datetime, consumed_by: str) -> None:
        self._tx._check()
        message = self._s.inbox.get(message_id)
        if message is None or message.consumed_at is not None:
            raise ConcurrencyError(f"inbox message {message_id} was consumed already")
        self._tx.set_item(
            self._s.inbox,
            message_id,
            evolve(message, {"consumed_at": consumed_at, "consumed_by": consumed_by}),
        )
        waiting = (message.workflow_run_id, message.kind, message.name)
        left = tuple(i for i in self._s.unconsumed.get(waiting, ()) if i != message_id)
        if left:
            self._tx.set_item(self._s.unconsumed, waiting, left)
        else:
            self._tx.del_item(self._s.unconsumed, waiting)

    async def for_run(self, run_id: str) -> list[InboxMessage]:
        return [self._s.inbox[i] for i in self._s.inbox_by_run.get(run_id, [])]

    async def find_update(self, run_id: str, update_id: str) -> InboxMessage | None:
        for message_id in self._s.inbox_by_run.get(run_id, []):
            message: InboxMessage = self._s.inbox[message_id]
            if message.kind == "update" and message.update_id == update_id:
                return message
        return None

    async def set_reply(self, message_id: int, reply: JsonValue) -> None:
        self._tx._check()
        message = self._s.inbox.get(message_id)
        if message is None or message.reply is not None:
            raise ConcurrencyError(f"update message {message_id} was answered already")
        self._tx.set_item(self._s.inbox, message_id, evolve(message, {"reply": reply}))
