"""The JobTransport port: a leased queue of stage executions.

State-changing calls take the caller's ``Transaction`` so a job is enqueued,
completed or failed atomically with the run/stage change that causes it.
``dequeue`` and ``extend_lease`` manage their own short transactions. Time is
always passed in by the kernel (the Clock port is the only time source).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from treadle.kernel.model import Job
from treadle.ports.persistence import Transaction


class JobTransport(Protocol):
    async def enqueue(self, tx: Transaction, jobs: Sequence[Job]) -> None:
        """Make ``jobs`` available from their ``next_poll_at``. A job given as LEASED
        (``worker_id``, ``attempts`` and ``heartbeat_at`` set) is stored leased to that
        worker instead, as ``dequeue`` would have left it: the enqueuing worker runs it
        itself, so no other worker is woken for it. Any other status is stored QUEUED."""

    async def dequeue(
        self,
        worker_id: str,
        now: datetime,
        *,
        limit: int = 1,
        queues: Sequence[str] | None = None,
        stage_ids: Sequence[str] | None = None,
    ) -> list[Job]:
        """Lease up to ``limit`` QUEUED jobs due at ``now``: priority desc, then FIFO.
        Each leased job has ``attempts`` incremented, ``worker_id`` and ``heartbeat_at`` set.
        With ``queues``, only jobs on those named queues (``Job.queue``); ``None``: any.
        With ``stage_ids``, only jobs of those stages (a remote worker serving some stages
        of a queue, ``docs/remote-workers.md``); ``None``: any."""

    async def get(self, tx: Transaction, job_id: str) -> Job | None: ...

    async def complete(self, tx: Transaction, job_id: str) -> None: ...

    async def get_many(self, tx: Transaction, job_ids: Sequence[str]) -> dict[str, Job]:
        """The jobs found, by id (missing ids are absent): ``get`` in one round trip."""

    async def complete_many(
        self,
        tx: Transaction,
        job_ids: Sequence[str],
        *,
        leases: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        """``complete`` for each; ``JobNotFoundError`` naming the missing ids if any is
        missing, and then none is completed. With ``leases`` (job id -> worker id and
        attempts), each job must still be LEASED to that worker at that attempt:
        otherwise ``ConcurrencyError`` naming the others, and none is completed (a
        commit that did not read its jobs back checks them so)."""

    async def suspend(self, tx: Transaction, job_id: str, next_poll_at: datetime) -> None:
        """Park a job for a suspended stage; it is not dequeued while SUSPENDED."""

    async def requeue(
        self,
        tx: Transaction,
        job_id: str,
        available_at: datetime,
        *,
        error: str | None = None,
        refund_attempt: bool = False,
    ) -> None:
        """Back to QUEUED (lease dropped), available from ``available_at`` (retry backoff).
        ``refund_attempt``: ``attempts`` goes back one (never below 0), for a lease the
        host gave up on purpose, which must not use up one of ``max_attempts``."""

    async def fail(self, tx: Transaction, job_id: str, error: str) -> None:
        """Terminal failure; the job is never dequeued again."""

    async def cancel_by_run(self, tx: Transaction, run_id: str) -> int:
        """Cancel every live job of the run; returns how many."""

    async def live_jobs(self, tx: Transaction, run_id: str) -> list[Job]:
        """QUEUED, LEASED and SUSPENDED jobs of the run."""

    async def extend_lease(self, job_id: str, worker_id: str, now: datetime) -> bool:
        """Heartbeat: refresh ``heartbeat_at`` if ``worker_id`` still holds the lease."""

    async def stale_leases(
        self, tx: Transaction, older_than: datetime, *, limit: int = 100
    ) -> list[Job]:
        """LEASED jobs whose last heartbeat is before ``older_than`` (worker presumed dead)."""

    async def next_due_at(self) -> datetime | None:
        """Earliest ``next_poll_at`` of a QUEUED job, for hosts that sleep until work is due."""
