"""The Scheduler port: run a command later (timers, delayed maintenance)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol


class Scheduler(Protocol):
    async def schedule(self, key: str, command: Mapping[str, Any], run_at: datetime) -> None:
        """Schedule ``command`` (a command mapping) at ``run_at``; same ``key`` replaces."""

    async def cancel(self, key: str) -> bool: ...

    async def due(self, now: datetime, *, limit: int = 100) -> list[Mapping[str, Any]]:
        """Remove and return commands due at ``now``, earliest first."""

    async def next_due_at(self) -> datetime | None: ...
