"""The ``jobs`` rows as the SQL job transport writes them, shared with the one-statement
commit (``persistence/write_set.py``), which writes new jobs without the transport."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import treadle.adapters.sql.pg_bulk as pg_bulk
import treadle.adapters.sql.schema as t
from treadle.adapters.due_times import as_utc
from treadle.kernel.model import Job, JobStatus

_JOB_FIELDS = (
    "id",
    "run_id",
    "workflow_id",
    "stage_id",
    "status",
    "priority",
    "attempts",
    "max_attempts",
    "next_poll_at",
    "enqueued_at",
    "worker_id",
    "heartbeat_at",
    "last_error",
    "queue",
)
_PG_JOB_ROWS = pg_bulk.RecordSet(t.jobs, {name: name for name in _JOB_FIELDS}, {"i": "INTEGER"})


def job_rows(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """The ``jobs`` rows ``enqueue`` inserts (also ``write_set.py``'s)."""
    return [
        {
            "id": job.id,
            "run_id": job.workflow_run_id,
            "workflow_id": job.workflow_id,
            "stage_id": job.stage_id,
            "status": _enqueued_status(job),
            "priority": job.priority,
            "attempts": job.attempts,
            "max_attempts": job.max_attempts,
            "next_poll_at": job.next_poll_at,
            "enqueued_at": job.enqueued_at,
            "worker_id": job.worker_id,
            "heartbeat_at": job.heartbeat_at,
            "last_error": job.last_error,
            "queue": job.queue,
        }
        for job in jobs
    ]


def _enqueued_status(job: Job) -> str:
    """LEASED for a job its enqueuing worker takes itself (see the port), else QUEUED."""
    return (JobStatus.LEASED if job.status is JobStatus.LEASED else JobStatus.QUEUED).value


def _available_later(job: Job) -> bool:
    """A QUEUED job that becomes available after it was enqueued: timed work. Most jobs
    are available as enqueued, which one comparison tells."""
    if job.next_poll_at == job.enqueued_at or job.status is JobStatus.LEASED:
        return False
    return as_utc(job.next_poll_at) > as_utc(job.enqueued_at)
