"""The EventSink port: where ``outbox.flush`` publishes committed events."""

from __future__ import annotations

from typing import Protocol

from treadle.kernel.events import EventBase


class EventSink(Protocol):
    async def publish(self, event: EventBase) -> None:
        """Deliver one event; raising makes the outbox retry it (then dead-letter it)."""
