"""``Chains``: the in-memory hand-off between a chained ``job.execute`` commit and the
execution of the job it chained (see ``handlers/jobs.py``).

A ``job.execute`` with ``chain=True`` whose commit advances the run leases the next
stage's job to the same worker and starts the stage in that commit. What phase 1 would
have read (run, stage, stages, definition) is kept here, by job id, for the
``job.execute`` of that job that follows, so it needs no transaction before its body
runs. Losing an entry costs only a read: without it, phase 1 recognises the stage it
started. ``stop(worker_id)`` makes later commits of that worker chain nothing (a worker
that is stopping takes no new work). ``serve(worker_id, queues)`` names the queues a
worker serves: a job on another queue is never leased to it by a commit (it is queued
for the workers of that queue instead).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from treadle.kernel.queues import DEFAULT_QUEUE

MAX_CHAINED = 1024
"""Hand-offs kept at most; the oldest go first (a caller that never executes its chained
jobs leaks nothing, and their execution falls back to reading the started stage)."""


_DEFAULT_ONLY = frozenset({DEFAULT_QUEUE})


class Chains:
    """Hand-offs by job id, and the workers that stopped chaining. Plain state, no I/O."""

    def __init__(self, limit: int = MAX_CHAINED) -> None:
        self.limit = limit
        self._started: dict[str, tuple[str, Any]] = {}
        self._stopped: set[str] = set()
        self._queues: dict[str, frozenset[str]] = {}

    def allows(self, worker_id: str) -> bool:
        return worker_id not in self._stopped

    def serve(self, worker_id: str, queues: Iterable[str]) -> None:
        """``worker_id`` leases only jobs of ``queues`` from now on."""
        self._queues[worker_id] = frozenset(queues)

    def serves(self, worker_id: str, queue: str) -> bool:
        """Whether a commit may lease a job of ``queue`` to ``worker_id``: a worker that
        named no queues serves the default one only."""
        return queue in self._queues.get(worker_id, _DEFAULT_ONLY)

    def stop(self, worker_id: str) -> None:
        """Commits of ``worker_id`` chain nothing from now on."""
        self._stopped.add(worker_id)

    def keep(self, job_id: str, worker_id: str, started: Any) -> None:
        while len(self._started) >= self.limit:
            self._started.pop(next(iter(self._started)))
        self._started[job_id] = (worker_id, started)

    def take(self, job_id: str, worker_id: str) -> Any:
        """The hand-off for ``job_id`` if ``worker_id`` holds it (removed), else ``None``;
        another worker's call leaves it in place."""
        entry = self._started.get(job_id)
        if entry is None or entry[0] != worker_id:
            return None
        del self._started[job_id]
        return entry[1]

    def forget(self, job_id: str) -> None:
        """Drop the hand-off of a chained job that will not be executed (released)."""
        self._started.pop(job_id, None)

    def clear(self) -> None:
        self._started.clear()

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._started

    def __len__(self) -> int:
        return len(self._started)
