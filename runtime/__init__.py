"""The shared host core: one job path, one maintenance tick, one worker loop and one
URL-to-ports composition root, used by every host (worker, serverless, Lambda, cron
tick) and by the ``Engine``'s in-process worker, so hosts differ only in their loop.

It may import the kernel, ports and adapters, never ``treadle.hosts``. SQL adapters
are imported only when a SQL URL is opened.
"""

from treadle.runtime.backends import Backend, backend_kind, open_backend
from treadle.runtime.backoff import Backoff
from treadle.runtime.jobs import execute_job, job_idempotency_key
from treadle.runtime.options import InvalidWorkerOptionsError, WorkerOptions, default_worker_id
from treadle.runtime.tick import STEP_ORDER, TickReport, TickStep, maintenance_tick
from treadle.runtime.worker import Worker

__all__ = [
    "STEP_ORDER",
    "Backend",
    "Backoff",
    "InvalidWorkerOptionsError",
    "TickReport",
    "TickStep",
    "Worker",
    "WorkerOptions",
    "backend_kind",
    "default_worker_id",
    "execute_job",
    "job_idempotency_key",
    "maintenance_tick",
    "open_backend",
]
