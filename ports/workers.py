"""The WorkerRegistry port: which worker processes are alive and which queues they serve.

A worker announces itself when it starts and on every orchestration tick (``beat``), and
leaves when it stops. Nothing in the job path depends on it: a job is leased by whoever
dequeues it. It exists so that an operator (``treadle doctor``, ``engine.queues()``) can
see a queue whose jobs wait because no live worker serves it, which is otherwise
indistinguishable from a busy queue.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from treadle.kernel.model import QueueDepth, WorkerInfo


class WorkerRegistry(Protocol):
    async def beat(self, worker: WorkerInfo) -> None:
        """Insert or refresh ``worker`` (its queues and ``heartbeat_at``)."""

    async def leave(self, worker_id: str) -> None:
        """Forget a worker that stopped cleanly (a crashed one ages out instead)."""

    async def list_workers(self) -> list[WorkerInfo]:
        """Every worker seen, most recently beating first; the caller judges liveness by
        ``heartbeat_at``."""

    async def prune(self, older_than: datetime) -> int:
        """Forget workers whose last beat is before ``older_than``; returns how many."""

    async def queue_depths(self, now: datetime) -> list[QueueDepth]:
        """Live jobs per named queue (queues with none are absent), by queue name."""
