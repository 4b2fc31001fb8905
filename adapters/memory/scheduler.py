"""In-memory Scheduler: commands keyed by name, released when due."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any


class InMemoryScheduler:
    def __init__(self) -> None:
        self.entries: dict[str, tuple[datetime, Mapping[str, Any]]] = {}

    async def schedule(self, key: str, command: Mapping[str, Any], run_at: datetime) -> None:
        if "type" not in command:
            raise ValueError(f"scheduled command {key!r} has no 'type'")
        self.entries[key] = (run_at, dict(command))

    async def cancel(self, key: str) -> bool:
        return self.entries.pop(key, None) is not None

    async def due(self, now: datetime, *, limit: int = 100) -> list[Mapping[str, Any]]:
        ready = sorted(((at, key) for key, (at, _) in self.entries.items() if at <= now))[:limit]
        return [self.entries.pop(key)[1] for _, key in ready]

    async def next_due_at(self) -> datetime | None:
        return min((at for at, _ in self.entries.values()), default=None)
