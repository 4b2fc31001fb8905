"""``SqsWakeups``: an SQS message for every job a committed transaction made available.

A serverless deployment has no worker polling the queue table, so something must
invoke the function when work exists. Wrap the backend's persistence and job
transport with ``SqsWakeups.wrap``: every ``enqueue`` and ``requeue`` inside a
transaction is remembered and, once that transaction has committed (never before,
never after a rollback), one message ``{"job_id": "..."}`` per job goes to the
queue, delayed until the job is due (SQS caps a delay at 15 minutes; a job due
later is found by the scheduled tick). The Lambda SQS handler then runs the job.

Messages are wake-ups, not the source of truth: the job table is. A duplicate, a
stale message (the job already ran) or one that arrives early is skipped by
``ServerlessHost.handle_job``, and a message that is lost (send failed, logged)
costs only latency until the next scheduled tick. Runs themselves are claimed by a
tick or a ``{}`` ("any available work") message: call ``request_work()`` after
starting runs from a client to have them claimed at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from treadle.adapters.logging import structlog_logger
from treadle.kernel.errors import describe_exception

if TYPE_CHECKING:
    from treadle.kernel.model import Job
    from treadle.ports import Clock, JobTransport, Persistence, Transaction

MAX_DELAY_SECONDS = 900
"""SQS's limit on ``DelaySeconds``."""


class SqsClient(Protocol):
    """The one method of a boto3 SQS client this adapter calls."""

    def send_message(self, *, QueueUrl: str, MessageBody: str, **kwargs: Any) -> Any: ...  # noqa: N803 - boto3's argument names


_pending: contextvars.ContextVar[list[tuple[str, datetime | None]] | None] = contextvars.ContextVar(
    "treadle_sqs_pending", default=None
)


class SqsWakeups:
    """Sends wake-up messages to ``queue_url`` through ``client`` (see the module
    docstring). ``sent`` and ``failed`` count messages, for logs and tests."""

    def __init__(
        self,
        client: SqsClient,
        queue_url: str,
        *,
        clock: Clock | None = None,
        logger: Any = None,
    ) -> None:
        self.client = client
        self.queue_url = queue_url
        self.clock = clock
        self.log = logger or structlog_logger("treadle.adapters.aws")
        self.sent = 0
        self.failed = 0

    def wrap(
        self, persistence: Persistence, job_transport: JobTransport
    ) -> tuple[Persistence, JobTransport]:
        """The two ports to build the kernel with instead of the originals."""
        return _Persistence(persistence, self), _JobTransport(job_transport)

    async def request_work(self) -> None:
        """Ask for any available work (``{}``): the handler claims PENDING runs and runs
        a due job. For clients that start runs and want them served before the tick."""
        await self._send("{}", 0)

    async def publish(self, jobs: Sequence[tuple[str, datetime | None]]) -> None:
        """One message per ``(job_id, available_at)``, delayed until it is due."""
        now = self.clock.now() if self.clock is not None else None
        for job_id, available_at in jobs:
            delay = 0
            if now is not None and available_at is not None:
                wait = (available_at - now).total_seconds()
                delay = min(MAX_DELAY_SECONDS, max(0, math.ceil(wait)))
            await self._send(json.dumps({"job_id": job_id}), delay)

    async def _send(self, body: str, delay: int) -> None:
        kwargs: dict[str, Any] = {"QueueUrl": self.queue_url, "MessageBody": body}
        if delay:
            kwargs["DelaySeconds"] = delay
        try:
            # boto3 blocks on the network: keep the event loop free meanwhile.
            await asyncio.to_thread(self.client.send_message, **kwargs)
        except Exception as exc:  # the commit stands; the scheduled tick finds the work
            self.failed += 1
            self.log.warning("sqs.wakeup_failed", body=body, error=describe_exception(exc))
            return
        self.sent += 1


class _Persistence:
    """Delegates to the wrapped persistence; publishes a transaction's jobs after it
    commits."""

    def __init__(self, inner: Persistence, wakeups: SqsWakeups) -> None:
        self._inner = inner
        self._wakeups = wakeups

    @asynccontextmanager
    async def transaction(self, **kwargs: Any) -> AsyncIterator[Transaction]:
        pending: list[tuple[str, datetime | None]] = []
        token = _pending.set(pending)
        try:
            async with self._inner.transaction(**kwargs) as tx:
                yield tx
        finally:
            _pending.reset(token)
        # Reached only when the inner transaction committed.
        if pending:
            await self._wakeups.publish(pending)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __getattr__(self, name: str) -> Any:  # adapter extras (e.g. SQL ``engine``)
        return getattr(self._inner, name)


class _JobTransport:
    """Delegates to the wrapped transport, noting jobs made available in the current
    transaction."""

    def __init__(self, inner: JobTransport) -> None:
        self._inner = inner

    async def enqueue(self, tx: Transaction, jobs: Sequence[Job]) -> None:
        await self._inner.enqueue(tx, jobs)
        _note([(job.id, job.next_poll_at) for job in jobs])

    async def requeue(
        self,
        tx: Transaction,
        job_id: str,
        available_at: datetime,
        *,
        error: str | None = None,
        refund_attempt: bool = False,
    ) -> None:
        await self._inner.requeue(
            tx, job_id, available_at, error=error, refund_attempt=refund_attempt
        )
        _note([(job_id, available_at)])

    # -- plain delegation ---------------------------------------------------------------
    async def dequeue(
        self,
        worker_id: str,
        now: datetime,
        *,
        limit: int = 1,
        queues: Sequence[str] | None = None,
        stage_ids: Sequence[str] | None = None,
    ) -> list[Job]:
        return await self._inner.dequeue(
            worker_id, now, limit=limit, queues=queues, stage_ids=stage_ids
        )

    async def get(self, tx: Transaction, job_id: str) -> Job | None:
        return await self._inner.get(tx, job_id)

    async def complete(self, tx: Transaction, job_id: str) -> None:
        await self._inner.complete(tx, job_id)

    async def get_many(self, tx: Transaction, job_ids: Sequence[str]) -> dict[str, Job]:
        return await self._inner.get_many(tx, job_ids)

    async def complete_many(
        self,
        tx: Transaction,
        job_ids: Sequence[str],
        *,
        leases: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        await self._inner.complete_many(tx, job_ids, leases=leases)

    async def suspend(self, tx: Transaction, job_id: str, next_poll_at: datetime) -> None:
        await self._inner.suspend(tx, job_id, next_poll_at)

    async def fail(self, tx: Transaction, job_id: str, error: str) -> None:
        await self._inner.fail(tx, job_id, error)

    async def cancel_by_run(self, tx: Transaction, run_id: str) -> int:
        return await self._inner.cancel_by_run(tx, run_id)

    async def live_jobs(self, tx: Transaction, run_id: str) -> list[Job]:
        return await self._inner.live_jobs(tx, run_id)

    async def extend_lease(self, job_id: str, worker_id: str, now: datetime) -> bool:
        return await self._inner.extend_lease(job_id, worker_id, now)

    async def stale_leases(
        self, tx: Transaction, older_than: datetime, *, limit: int = 100
    ) -> list[Job]:
        return await self._inner.stale_leases(tx, older_than, limit=limit)

    async def next_due_at(self) -> datetime | None:
        return await self._inner.next_due_at()

    def __getattr__(self, name: str) -> Any:  # adapter extras (e.g. the memory ``jobs``)
        return getattr(self._inner, name)


def _note(jobs: list[tuple[str, datetime | None]]) -> None:
    pending = _pending.get()
    if pending is not None:
        pending.extend(jobs)
