"""In-memory WorkerRegistry: the workers of this process, and queue depths read from the
``InMemoryJobTransport`` they serve."""

from __future__ import annotations

from datetime import datetime

from treadle.adapters.memory.job_transport import InMemoryJobTransport
from treadle.kernel.model import JobStatus, QueueDepth, WorkerInfo


class InMemoryWorkerRegistry:
    """Pass the job transport whose queues ``queue_depths`` counts."""

    def __init__(self, job_transport: InMemoryJobTransport) -> None:
        self.job_transport = job_transport
        self._workers: dict[str, WorkerInfo] = {}

    async def beat(self, worker: WorkerInfo) -> None:
        self._workers[worker.worker_id] = worker

    async def leave(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def list_workers(self) -> list[WorkerInfo]:
        return sorted(self._workers.values(), key=lambda w: w.heartbeat_at, reverse=True)

    async def prune(self, older_than: datetime) -> int:
        gone = [w.worker_id for w in self._workers.values() if w.heartbeat_at < older_than]
        for worker_id in gone:
            del self._workers[worker_id]
        return len(gone)

    async def queue_depths(self, now: datetime) -> list[QueueDepth]:
        counts: dict[str, dict[str, int]] = {}
        oldest: dict[str, datetime] = {}
        for job in list(self.job_transport.jobs.values()):
            if job.status is JobStatus.QUEUED:
                kind = "queued" if job.next_poll_at <= now else "scheduled"
                if kind == "queued" and (
                    job.queue not in oldest or job.next_poll_at < oldest[job.queue]
                ):
                    oldest[job.queue] = job.next_poll_at
            elif job.status is JobStatus.LEASED:
                kind = "leased"
            else:
                continue
            by_kind = counts.setdefault(job.queue, {})
            by_kind[kind] = by_kind.get(kind, 0) + 1
        return [
            QueueDepth(queue=queue, oldest_due_at=oldest.get(queue), **counts[queue])
            for queue in sorted(counts)
        ]
