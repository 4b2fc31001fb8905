"""The inbox concern of the Persistence port: signals and updates delivered to a code
workflow, each consumed exactly once."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from treadle.kernel.model import JsonValue
from treadle.kernel.workflows.model import InboxMessage


class InboxStore(Protocol):
    """A code workflow's inbox of signals and updates (``tx.inbox``)."""

    async def insert(self, message: InboxMessage) -> InboxMessage:
        """Append to the run's inbox; returns it with its ``id`` (ids grow in arrival
        order). ``DuplicateError`` if the run has a message with the same idempotency key."""

    async def next_message(
        self, run_id: str, name: str, *, kind: str = "signal"
    ) -> InboxMessage | None:
        """The run's oldest unconsumed message of ``kind`` (signal, update) called ``name``."""

    async def consume(self, message_id: int, consumed_at: datetime, consumed_by: str) -> None:
        """Mark a message consumed; ``ConcurrencyError`` if it was consumed already or is
        missing, so no signal is ever delivered twice."""

    async def for_run(self, run_id: str) -> list[InboxMessage]:
        """The run's inbox in arrival order, consumed or not."""

    async def find_update(self, run_id: str, update_id: str) -> InboxMessage | None:
        """The update message with this ``update_id``, if the run received it."""

    async def set_reply(self, message_id: int, reply: JsonValue) -> None:
        """Store the workflow's reply to an update; ``ConcurrencyError`` if it already has one."""
