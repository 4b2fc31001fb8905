"""The serverless host: run work in bounded calls instead of a loop (DESIGN.md §7).

A function platform (AWS Lambda, Cloud Run jobs, a cron container) has no process
that lives between invocations, so the host is three calls on ``ServerlessHost``
over the same job path (``runtime.execute_job``) and maintenance tick
(``runtime.maintenance_tick``) the worker process uses:

- ``handle_job(message)``: one queue message, one job. A message names a job
  (``{"job_id": "..."}``) or asks for any available work (``{}``). The named job is
  a hint, not a lease: the host dequeues the highest-priority due job, which is
  the named one unless other work came first (then the named job's own turn comes
  with another message or the next tick). A message for a job that finished, is
  waiting, is held by another worker or is not yet due is *skipped*, so duplicate
  and stale messages are harmless.
- ``process_available_jobs(max_jobs=None, deadline=None)``: claim PENDING runs,
  then run due jobs (up to ``concurrency`` at once) until the queue is empty,
  ``max_jobs`` have been started or the deadline comes; a job that finishes
  enqueues its run's next group, which the same call then runs.
- ``run_maintenance_tick()``: one ``TickReport`` (claim, poll suspended, scheduled,
  reap stale leases, flush outbox, reap stuck runs; what each step did or its error).

A ``deadline`` is a ``datetime`` (aware, wall clock) or a budget in seconds or a
``timedelta`` from the call. At the deadline no new job is taken, and a job still
running is cancelled and *released*: back in the queue at once (its stage
PENDING, a ``stage:failed`` event with ``will_retry``), for the next invocation.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from treadle.adapters.logging import structlog_logger
from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import TreadleError, describe_exception
from treadle.kernel.model import JobStatus
from treadle.kernel.registry import refuse_remote_queues
from treadle.kernel.schedule_client import declared_schedules
from treadle.runtime.backends import Backend, open_backend
from treadle.runtime.jobs import execute_job
from treadle.runtime.options import WorkerOptions
from treadle.runtime.tick import TickReport, claim_step, maintenance_tick

if TYPE_CHECKING:
    from treadle.kernel.kernel import Kernel
    from treadle.kernel.model import Job

__all__ = [
    "Deadline",
    "JobOutcome",
    "JobStatusName",
    "ProcessReport",
    "ServerlessHost",
    "parse_message",
]

Deadline = datetime | timedelta | float | int | None

JobStatusName = Literal[
    "completed", "suspended", "failed", "ghost", "error", "released", "deferred", "idle", "skipped"
]
"""What became of one message:

- ``completed`` / ``suspended``: the stage's result or suspension was committed;
- ``failed``: the stage failed; the kernel recorded it and scheduled the retry (or
  failed the run for good), so the message is done;
- ``ghost``: the result was discarded (run cancelled, or the job moved on);
- ``error``: the execution itself raised (storage down): the kernel released the
  job with backoff where it could, and the message should be delivered again;
- ``released``: cut off by the deadline and handed back; deliver again;
- ``deferred``: not started, the deadline had already passed; deliver again;
- ``idle``: no job was due;
- ``skipped``: the named job needs nothing from us (finished, waiting, held by
  another worker, not due yet or unknown): a duplicate or stale message.
"""

_DONE = frozenset({"completed", "suspended", "failed", "ghost", "idle", "skipped"})


class JobOutcome(BaseModel):
    """The answer to ``handle_job``: ``ok`` tells a queue whether to delete the message
    (``True``) or let it be delivered again (``False``)."""

    model_config = ConfigDict(frozen=True)

    status: JobStatusName
    requested_job_id: str | None = None
    """The job the message named, if any."""
    job_id: str | None = None
    """The job executed (may differ from the requested one; see the module docstring)."""
    workflow_run_id: str | None = None
    stage_id: str | None = None
    error: str | None = None
    retryable: bool | None = None
    """For ``failed``: whether the kernel scheduled another attempt."""
    reason: str | None = None
    """Why a message was skipped, deferred or released."""

    @property
    def ok(self) -> bool:
        return self.status in _DONE


class ProcessReport(BaseModel):
    """What ``process_available_jobs`` did.

    ``processed`` jobs ran to a verdict: ``succeeded`` (completed or suspended) plus
    ``failed`` (stage failures, ghosts, executions that raised). ``released`` jobs were
    cut off by the deadline and handed back; they are not in ``processed``.
    """

    model_config = ConfigDict(frozen=True)

    processed: int = 0
    succeeded: int = 0
    failed: int = 0
    released: int = 0
    claimed_runs: int = 0
    stopped: Literal["idle", "max_jobs", "deadline", "error"] = "idle"
    """Why the call returned: the queue had no due job, ``max_jobs`` were started, the
    deadline came, or storage failed (see ``error``)."""
    error: str | None = None
    outcomes: list[JobOutcome] = Field(default_factory=list)


def parse_message(message: Any) -> str | None:
    """The job id a queue message names, ``None`` for "any available work".

    Accepts a mapping (``{"job_id": "..."}``, ``{}``), its JSON text, a bare job id
    string, or ``None``. Anything else is a ``TreadleError`` naming the problem.
    """
    if message is None:
        return None
    if isinstance(message, bytes | bytearray):
        message = message.decode("utf-8", errors="replace")
    if isinstance(message, str):
        text = message.strip()
        if not text:
            return None
        if not text.startswith("{"):
            return text  # a bare job id
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TreadleError(f"message is not valid JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(message, Mapping):
        raise TreadleError(
            f"message must be a mapping like {{'job_id': ...}}, got {type(message).__name__}"
        )
    job_id = message.get("job_id")
    if job_id is None:
        return None
    if not isinstance(job_id, str) or not job_id:
        raise TreadleError(f"message job_id must be a non-empty string, got {job_id!r}")
    return job_id


SERVERLESS_DEFAULTS: Mapping[str, Any] = {"concurrency": 1}
"""Where a serverless host's options differ from a worker's: one job at a time unless
told otherwise (scale with the function's own concurrency)."""


class ServerlessHost:
    """Serverless entry points over one kernel (see the module docstring).

    Build it from a kernel (``ServerlessHost(kernel)``: the caller owns the ports) or
    from a URL (``await ServerlessHost.open("postgresql+psycopg://...", workflows)``:
    the host owns the backend and ``aclose()`` releases it).
    """

    def __init__(
        self,
        kernel: Kernel,
        options: WorkerOptions | Mapping[str, Any] | None = None,
        *,
        backend: Backend | None = None,
        logger: Any = None,
        **overrides: Any,
    ) -> None:
        """``options`` and ``overrides``: see ``WorkerOptions`` (here ``concurrency``
        defaults to 1, and the loop intervals do not apply)."""
        self.options = opts = WorkerOptions.build(options, overrides, defaults=SERVERLESS_DEFAULTS)
        self.kernel = kernel
        self.backend = backend
        self.worker_id = opts.worker_id
        self.concurrency = opts.concurrency
        self.stale_lease_threshold = opts.stale_lease_threshold
        self.stuck_threshold = opts.stuck_threshold
        self.heartbeat_interval = opts.heartbeat
        self.max_claims = opts.max_claims
        self.queues = opts.queues
        """The named queues whose jobs this host takes (``kernel/queues.py``)."""
        refuse_remote_queues(kernel.deps.registry, self.queues, f"host {self.worker_id!r}")
        kernel.deps.chains.serve(self.worker_id, self.queues)
        self.log = (logger or structlog_logger("treadle.hosts.serverless")).bind(
            worker_id=self.worker_id
        )
        self._unwatch_ends: Callable[[], None] | None = None
        watch = getattr(kernel.deps.persistence, "watch_run_ends", None)
        if kernel.deps.telemetry is not None and watch is not None:  # runs it ends, counted
            self._unwatch_ends = watch(kernel.deps.telemetry.runs_ended)

    @classmethod
    async def open(
        cls,
        db: str,
        workflows: Iterable[WorkflowDefinition] = (),
        *,
        backend: Backend | None = None,
        options: WorkerOptions | Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> ServerlessHost:
        """A host on the backend ``db`` names (``open_backend``), or on ``backend`` when
        given (e.g. one wrapped with SQS wake-ups); it closes the backend on ``aclose``.
        ``telemetry=`` (an ``OtelTelemetry``; the ``otel`` extra): spans of the stages
        it runs, joined to each run's trace, and Treadle's metrics."""
        opened = backend if backend is not None else await open_backend(db)
        try:
            logger = overrides.pop("logger", None)
            telemetry = overrides.pop("telemetry", None)
            opts = WorkerOptions.build(options, overrides, defaults=SERVERLESS_DEFAULTS)
            definitions = list(workflows)
            kernel = opened.kernel(
                definitions,
                logger=structlog_logger("treadle", worker_id=opts.worker_id),
                telemetry=telemetry,
            )
            declared = declared_schedules(definitions)
            if declared:  # @workflow(schedule=...): created, or kept in step with the code
                await kernel.schedules.sync(declared)
            return cls(kernel, opts, backend=opened, logger=logger)
        except BaseException:
            await opened.aclose()
            raise

    async def aclose(self) -> None:
        if self._unwatch_ends is not None:
            self._unwatch_ends()
        self.kernel.close()
        if self.backend is not None:
            backend, self.backend = self.backend, None
            await backend.aclose()

    async def __aenter__(self) -> ServerlessHost:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the three entry points ---------------------------------------------------------
    async def handle_job(self, message: Any, *, deadline: Deadline = None) -> JobOutcome:
        """Handle one queue message (see the module docstring); never raises for a
        failed stage or storage error: the outcome says what happened. A malformed
        message raises ``TreadleError`` (it will never succeed; let it dead-letter)."""
        requested = parse_message(message)
        until = _monotonic_deadline(deadline)
        if until is not None and time.monotonic() >= until:
            return JobOutcome(status="deferred", requested_job_id=requested, reason="deadline")
        deps = self.kernel.deps
        try:
            if requested is not None:
                skip = await self._skip_reason(requested)
                if skip is not None:
                    self.log.debug("serverless.message_skipped", job_id=requested, reason=skip)
                    return JobOutcome(status="skipped", requested_job_id=requested, reason=skip)
            else:
                await claim_step(self.kernel, worker_id=self.worker_id, max_claims=self.max_claims)
            jobs = await deps.job_transport.dequeue(
                self.worker_id, deps.clock.now(), limit=1, queues=self.queues
            )
        except Exception as exc:
            self.log.error("serverless.dequeue_failed", error=describe_exception(exc))
            return JobOutcome(
                status="error", requested_job_id=requested, error=describe_exception(exc)
            )
        if not jobs:
            return JobOutcome(status="idle", requested_job_id=requested)
        return await self._run(jobs[0], until, requested)

    async def process_available_jobs(
        self, max_jobs: int | None = None, deadline: Deadline = None
    ) -> ProcessReport:
        """Run due jobs until none is due, ``max_jobs`` were started or ``deadline``."""
        given: object = max_jobs  # checked at runtime: may come from an event payload
        if given is not None and (
            isinstance(given, bool) or not isinstance(given, int) or given < 0
        ):
            raise ValueError(f"max_jobs must be a non-negative integer, got {max_jobs!r}")
        until = _monotonic_deadline(deadline)
        deps = self.kernel.deps
        outcomes: list[JobOutcome] = []
        in_flight: set[asyncio.Task[JobOutcome]] = set()
        started = claimed = 0
        stopped: Literal["idle", "max_jobs", "deadline", "error"] = "idle"
        error: str | None = None
        try:
            claim = await claim_step(
                self.kernel, worker_id=self.worker_id, max_claims=self.max_claims
            )
            claimed = len(claim.get("claimed", ()))
        except Exception as exc:  # claiming is a courtesy; the tick claims too
            self.log.warning("serverless.claim_failed", error=describe_exception(exc))
        while True:
            if until is not None and time.monotonic() >= until:
                stopped = "deadline"
                break
            if max_jobs is not None and started >= max_jobs:
                stopped = "max_jobs"
                break
            free = self.concurrency - len(in_flight)
            if max_jobs is not None:
                free = min(free, max_jobs - started)
            jobs: list[Job] = []
            if free > 0:
                try:
                    jobs = await deps.job_transport.dequeue(
                        self.worker_id, deps.clock.now(), limit=free, queues=self.queues
                    )
                except Exception as exc:
                    error = describe_exception(exc)
                    self.log.error("serverless.dequeue_failed", error=error)
                    stopped = "error"
                    break
            for job in jobs:
                in_flight.add(asyncio.ensure_future(self._run(job, until, None)))
                started += 1
            if not in_flight:
                break  # nothing due and nothing running: idle
            # Wait for a job to finish: its commit may have enqueued its run's next group.
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            outcomes.extend(task.result() for task in done)
        if in_flight:  # each job stops at the deadline by itself
            done, _ = await asyncio.wait(in_flight)
            outcomes.extend(task.result() for task in done)
        succeeded = sum(o.status in ("completed", "suspended") for o in outcomes)
        released = sum(o.status == "released" for o in outcomes)
        report = ProcessReport(
            processed=len(outcomes) - released,
            succeeded=succeeded,
            failed=len(outcomes) - released - succeeded,
            released=released,
            claimed_runs=claimed,
            stopped=stopped,
            error=error,
            outcomes=outcomes,
        )
        self.log.info(
            "serverless.processed",
            processed=report.processed,
            succeeded=report.succeeded,
            failed=report.failed,
            released=report.released,
            stopped=report.stopped,
        )
        return report

    async def run_maintenance_tick(self) -> TickReport:
        """One maintenance tick; the report names every step's result or error."""
        return await maintenance_tick(
            self.kernel,
            worker_id=self.worker_id,
            stale_threshold=self.stale_lease_threshold,
            stuck_threshold=self.stuck_threshold,
            max_claims=self.max_claims,
            logger=self.log,
        )

    # -- internals ----------------------------------------------------------------------
    async def _skip_reason(self, job_id: str) -> str | None:
        """Why a message naming ``job_id`` needs no work now, or ``None`` if it does."""
        deps = self.kernel.deps
        async with deps.persistence.transaction() as tx:
            job = await deps.job_transport.get(tx, job_id)
        if job is None:
            return "unknown job"
        if job.status is JobStatus.QUEUED:
            if job.next_poll_at > deps.clock.now():
                return f"not due until {job.next_poll_at.isoformat()}"
            return None
        if job.status is JobStatus.LEASED:
            return f"leased by {job.worker_id!r}"
        return f"job is {job.status.value}"

    async def _run(self, job: Job, until: float | None, requested: str | None) -> JobOutcome:
        base: dict[str, Any] = {
            "requested_job_id": requested,
            "job_id": job.id,
            "workflow_run_id": job.workflow_run_id,
            "stage_id": job.stage_id,
        }
        cut_off = False  # set just before this host cancels the execution itself
        task = asyncio.ensure_future(
            execute_job(
                self.kernel,
                job,
                worker_id=self.worker_id,
                heartbeat_interval=self.heartbeat_interval,
                logger=self.log,
                stopping=lambda: cut_off,
            )
        )
        timeout = None if until is None else max(0.0, until - time.monotonic())
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            cut_off = True
            task.cancel()  # execute_job releases the job (attempt refunded) before re-raising
            await asyncio.wait([task])
            self.log.warning("serverless.job_released", job_id=job.id, reason="deadline")
            return JobOutcome(status="released", reason="deadline", **base)
        result = task.result()
        if result is None:
            return JobOutcome(status="error", error="job.execute raised (see the log)", **base)
        status: JobStatusName = "ghost" if result.ghost else result.outcome
        return JobOutcome(status=status, error=result.error, retryable=result.retryable, **base)


def _monotonic_deadline(deadline: Deadline) -> float | None:
    """``deadline`` as a ``time.monotonic()`` instant."""
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise ValueError("deadline must be timezone-aware (e.g. datetime.now(UTC))")
        return time.monotonic() + (deadline - datetime.now(UTC)).total_seconds()
    if isinstance(deadline, timedelta):
        return time.monotonic() + deadline.total_seconds()
    if isinstance(deadline, bool) or not isinstance(deadline, int | float):
        raise ValueError(f"deadline must be a datetime, timedelta or seconds, got {deadline!r}")
    return time.monotonic() + float(deadline)
