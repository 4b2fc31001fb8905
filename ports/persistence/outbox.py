"""The outbox concern of the Persistence port: events written with the state they
describe, published later in per-run order (``outbox.flush``), dead-lettered on failure."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from treadle.kernel.events import EventBase, OutboxRecord


class OutboxStore(Protocol):
    """The outbox, as seen by one unit of work (``tx.outbox``)."""

    async def append(self, events: Sequence[EventBase]) -> list[EventBase]:
        """Append to the outbox, assigning each run's next gap-free ``sequence``."""

    async def unpublished(self, limit: int) -> list[OutboxRecord]:
        """Oldest unpublished, not dead-lettered rows; per-run sequence order preserved."""

    async def mark_published(self, outbox_ids: Sequence[int]) -> None:
        """Mark the rows published (``unpublished`` no longer returns them)."""

    async def record_failure(
        self, outbox_id: int, error: str, *, dead_letter: bool, retry_at: datetime | None = None
    ) -> None:
        """Count a failed publish of the row; ``dead_letter`` moves it to the DLQ;
        ``retry_at``: not before then (``OutboxRecord.retry_at``)."""

    async def dead_lettered(self, limit: int) -> list[OutboxRecord]:
        """Dead-lettered rows, oldest first."""

    async def requeue_dead_letters(self, outbox_ids: Sequence[int]) -> int:
        """Put the dead-lettered rows among ``outbox_ids`` back in the outbox with a
        fresh retry budget (``attempts`` 0), so the next ``unpublished`` returns
        them in outbox order, due at once (no ``retry_at``); returns how many were
        dead-lettered (others are skipped)."""

    async def events_for_run(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        """The run's events in sequence order, as typed models."""

    async def events_after(self, after_id: int, limit: int) -> list[tuple[int, EventBase]]:
        """Up to ``limit`` events of every run appended after outbox row ``after_id``,
        each with its row id, in row id order (the all-runs feed; published or not)."""

    async def last_event_id(self) -> int:
        """The highest outbox row id (0 when the outbox is empty)."""
