"""Kernel plugins: extra consumers of committed events, fed by ``outbox.flush``."""

from __future__ import annotations

from typing import Protocol

from treadle.kernel.events import EventBase


class KernelPlugin(Protocol):
    name: str

    async def on_event(self, event: EventBase) -> None:
        """Handle one committed event; raising makes the outbox retry, then dead-letter."""
