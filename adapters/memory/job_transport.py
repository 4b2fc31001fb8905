"""In-memory JobTransport: a priority queue with leases, inside the persistence's
transactions.

Jobs live in a dict; a ready heap ordered by (priority desc, available-at,
enqueue sequence) gives O(log n) dequeues. Heap entries are validated lazily
against the job's current state, and a rolled-back transaction simply marks
the heaps for rebuilding, so the queue can never serve a job that did not commit.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from treadle.adapters.memory.persistence import (
    _MISSING,
    InMemoryPersistence,
    InMemoryTransaction,
)
from treadle.kernel.errors import ConcurrencyError, DuplicateError, JobNotFoundError, TreadleError
from treadle.kernel.model import Job, JobStatus, evolve

# Bound once: an enum member read through its class costs several global reads.
_LEASED = JobStatus.LEASED
_QUEUED = JobStatus.QUEUED
_COMPLETED = JobStatus.COMPLETED


def _tx(tx: Any) -> InMemoryTransaction:
    if not isinstance(tx, InMemoryTransaction):
        raise TreadleError(
            "InMemoryJobTransport needs a transaction from InMemoryPersistence, got "
            f"{type(tx).__name__}"
        )
    return tx


class InMemoryJobTransport:
    """Pass the ``InMemoryPersistence`` it shares transactions with."""

    def __init__(self, persistence: InMemoryPersistence | None = None) -> None:
        self._lock = persistence.lock if persistence is not None else asyncio.Lock()
        self.jobs: dict[str, Job] = {}
        self._by_run: dict[str, set[str]] = {}
        self._leased: set[str] = set()
        self._heap: list[tuple[int, datetime, int, str]] = []
        self._seq = 0
        self._dirty = False
        self._on_rollback = self._mark_dirty  # one bound method, recognised by identity

    # -- helpers -------------------------------------------------------------------
    def _store(self, tx: InMemoryTransaction, job: Job) -> None:
        fields = job.__dict__  # one read through pydantic's ``__getattr__`` hook
        jobs, job_id, status = self.jobs, fields["id"], fields["status"]
        tx._undo.append((jobs, job_id, jobs.get(job_id, _MISSING)))  # set_item, inlined
        jobs[job_id] = job
        if status is _LEASED:
            self._leased.add(job_id)
        else:
            self._leased.discard(job_id)
            if status is _QUEUED:
                entry = (-fields["priority"], fields["next_poll_at"], fields["sequence"], job_id)
                heapq.heappush(self._heap, entry)
        once = tx._once
        if once is None or self._on_rollback not in once:  # on_rollback_once's own test
            tx.on_rollback_once(self._on_rollback)

    def _mark_dirty(self) -> None:
        self._dirty = True

    def _rebuild(self) -> None:
        self._heap = [
            (-j.priority, j.next_poll_at, j.sequence, j.id)
            for j in self.jobs.values()
            if j.status is JobStatus.QUEUED
        ]
        heapq.heapify(self._heap)
        self._leased = {j.id for j in self.jobs.values() if j.status is JobStatus.LEASED}
        self._by_run = {}
        for job in self.jobs.values():
            self._by_run.setdefault(job.workflow_run_id, set()).add(job.id)
        self._dirty = False

    def _fresh(self) -> None:
        """Indexes touched by a rolled-back transaction are rebuilt before use, so a
        rolled-back enqueue leaves no phantom id in ``_by_run`` or ``_leased``."""
        if self._dirty:
            self._rebuild()

    def _require(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        return job

    # -- transactional operations -------------------------------------------------------
    async def enqueue(self, tx: Any, jobs: Sequence[Job]) -> None:
        t = tx if isinstance(tx, InMemoryTransaction) else _tx(tx)
        for job in jobs:
            fields = job.__dict__  # one read through pydantic's ``__getattr__`` hook
            job_id, run_id = fields["id"], fields["workflow_run_id"]
            if job_id in self.jobs:
                raise DuplicateError(f"job {job_id!r} already exists")
            self._seq += 1
            # LEASED: a job its enqueuing worker takes itself (a chained stage); else QUEUED.
            status = _LEASED if fields["status"] is _LEASED else _QUEUED
            job = evolve(job, {"status": status, "sequence": self._seq})
            # Not ``setdefault(..., set())``: that builds (and drops) a set per job.
            of_run = self._by_run.get(run_id)
            if of_run is None:
                of_run = self._by_run[run_id] = set()
            of_run.add(job_id)
            self._store(t, job)

    async def get(self, tx: Any, job_id: str) -> Job | None:
        if not isinstance(tx, InMemoryTransaction):  # ``_tx``, inlined: every stage
            _tx(tx)
        return self.jobs.get(job_id)

    async def complete(self, tx: Any, job_id: str) -> None:
        job = self._require(job_id)
        t = tx if isinstance(tx, InMemoryTransaction) else _tx(tx)
        self._store(t, evolve(job, {"status": _COMPLETED, "worker_id": None}))

    async def get_many(self, tx: Any, job_ids: Sequence[str]) -> dict[str, Job]:
        _tx(tx)
        jobs = self.jobs
        return {job_id: jobs[job_id] for job_id in job_ids if job_id in jobs}

    async def complete_many(
        self,
        tx: Any,
        job_ids: Sequence[str],
        *,
        leases: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        # All checked first: a missing id (or a lease moved on) completes none of them.
        missing = [job_id for job_id in dict.fromkeys(job_ids) if job_id not in self.jobs]
        if missing:
            raise JobNotFoundError(f"no job with id(s) {', '.join(map(repr, missing))}")
        if leases is not None:
            moved = [
                job_id
                for job_id in dict.fromkeys(job_ids)
                if (job := self.jobs[job_id]).status is not JobStatus.LEASED
                or (job.worker_id, job.attempts) != leases.get(job_id)
            ]
            if moved:
                raise ConcurrencyError(
                    f"job(s) {', '.join(map(repr, moved))} are no longer leased as expected"
                )
        for job_id in job_ids:
            await self.complete(tx, job_id)

    async def suspend(self, tx: Any, job_id: str, next_poll_at: datetime) -> None:
        job = self._require(job_id)
        self._store(
            _tx(tx),
            evolve(
                job,
                {
                    "status": JobStatus.SUSPENDED,
                    "next_poll_at": next_poll_at,
                    "worker_id": None,
                },
            ),
        )

    async def requeue(
        self,
        tx: Any,
        job_id: str,
        available_at: datetime,
        *,
        error: str | None = None,
        refund_attempt: bool = False,
    ) -> None:
        job = self._require(job_id)
        self._store(
            _tx(tx),
            evolve(
                job,
                {
                    "status": JobStatus.QUEUED,
                    "next_poll_at": available_at,
                    "worker_id": None,
                    "heartbeat_at": None,
                    "last_error": error if error is not None else job.last_error,
                    "attempts": max(job.attempts - 1, 0) if refund_attempt else job.attempts,
                },
            ),
        )

    async def fail(self, tx: Any, job_id: str, error: str) -> None:
        job = self._require(job_id)
        self._store(
            _tx(tx),
            evolve(job, {"status": JobStatus.FAILED, "last_error": error, "worker_id": None}),
        )

    async def cancel_by_run(self, tx: Any, run_id: str) -> int:
        t = _tx(tx)
        self._fresh()
        count = 0
        for job_id in sorted(self._by_run.get(run_id, ())):
            job = self.jobs[job_id]
            if job.status.live:
                self._store(t, evolve(job, {"status": JobStatus.CANCELLED, "worker_id": None}))
                count += 1
        return count

    async def forget_runs(self, tx: Any, run_ids: Sequence[str]) -> int:
        """Delete the jobs of ``run_ids`` that are no longer live (retention's purge; on
        SQL the retention adapter deletes the ``jobs`` rows itself). Returns how many."""
        t = _tx(tx)
        self._fresh()
        gone = 0
        for run_id in run_ids:
            for job_id in sorted(self._by_run.get(run_id, ())):
                if not self.jobs[job_id].status.live:
                    t.del_item(self.jobs, job_id)
                    gone += 1
        if gone:
            self._dirty = True  # indexes rebuilt before next use, and after a rollback
            t.on_rollback_once(self._on_rollback)
        return gone

    async def live_jobs(self, tx: Any, run_id: str) -> list[Job]:
        _tx(tx)
        self._fresh()
        return [
            self.jobs[j] for j in sorted(self._by_run.get(run_id, ())) if self.jobs[j].status.live
        ]

    async def stale_leases(self, tx: Any, older_than: datetime, *, limit: int = 100) -> list[Job]:
        _tx(tx)
        self._fresh()
        stale = [
            self.jobs[j]
            for j in self._leased
            if (self.jobs[j].heartbeat_at or older_than) < older_than
        ]
        stale.sort(key=lambda j: (j.heartbeat_at, j.sequence))
        return stale[:limit]

    # -- own-transaction operations -------------------------------------------------------
    async def dequeue(
        self,
        worker_id: str,
        now: datetime,
        *,
        limit: int = 1,
        queues: Sequence[str] | None = None,
        stage_ids: Sequence[str] | None = None,
    ) -> list[Job]:
        served = None if queues is None else frozenset(queues)
        stages = None if stage_ids is None else frozenset(stage_ids)
        async with self._lock:
            if self._dirty:
                self._rebuild()
            leased: list[Job] = []
            deferred: list[tuple[int, datetime, int, str]] = []
            while self._heap and len(leased) < limit:
                entry = heapq.heappop(self._heap)
                _, available_at, seq, job_id = entry
                job = self.jobs.get(job_id)
                if (
                    job is None
                    or job.status is not JobStatus.QUEUED
                    or job.next_poll_at != available_at
                    or job.sequence != seq
                ):
                    continue  # stale entry
                if (
                    available_at > now
                    or (served is not None and job.queue not in served)
                    or (stages is not None and job.stage_id not in stages)
                ):
                    deferred.append(entry)  # not yet, or another queue's
                    continue
                job = evolve(
                    job,
                    {
                        "status": JobStatus.LEASED,
                        "worker_id": worker_id,
                        "heartbeat_at": now,
                        "attempts": job.attempts + 1,
                    },
                )
                self.jobs[job_id] = job
                self._leased.add(job_id)
                leased.append(job)
            for entry in deferred:
                heapq.heappush(self._heap, entry)
            return leased

    async def extend_lease(self, job_id: str, worker_id: str, now: datetime) -> bool:
        async with self._lock:
            job = self.jobs.get(job_id)
            if job is None or job.status is not JobStatus.LEASED or job.worker_id != worker_id:
                return False
            self.jobs[job_id] = evolve(job, {"heartbeat_at": now})
            return True

    def has_leased(self) -> bool:
        """Whether any job is leased right now (a cheap check for test drivers)."""
        self._fresh()
        return bool(self._leased)

    async def next_due_at(self) -> datetime | None:
        return min(
            (j.next_poll_at for j in self.jobs.values() if j.status is JobStatus.QUEUED),
            default=None,
        )
