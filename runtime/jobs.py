"""The one job path every host shares: execute a leased job while heartbeating it.

The worker loop, the serverless ``handle_job`` and the Lambda SQS handler all
run a dequeued job through ``execute_job``, so lease keeping, the per-attempt
idempotency key and the recovery after a failed execution live in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from treadle.adapters.logging import structlog_logger
from treadle.kernel import commands as c
from treadle.kernel.errors import describe_exception
from treadle.kernel.model import construct

if TYPE_CHECKING:
    from treadle.kernel.kernel import Kernel
    from treadle.kernel.model import Job
    from treadle.runtime.releases import ReleaseRetries

DEFAULT_HEARTBEAT_INTERVAL = 15.0
"""Seconds between lease extensions: a quarter of the default 60 s stale-lease threshold,
so three beats can be lost before another worker takes the job over."""

RELEASE_TIMEOUT = 10.0
"""Seconds a cancelled execution may spend handing its job back before giving up: past
that (storage down), the lease simply expires and ``lease.reapStale`` releases it."""


def job_idempotency_key(job: Job) -> str:
    """The key of one delivery attempt: a redelivered message of the same attempt replays
    the recorded result instead of running the stage twice, while the next attempt (after
    a retry or a reaped lease) gets a fresh key and really runs."""
    return f"job:{job.id}:{job.attempts}"


def _delivery_key(kernel: Kernel, job: Job) -> str | None:
    """``job_idempotency_key``, except for a job this process was handed by a chained
    commit or claim (``kernel.deps.chains`` holds its started state): that attempt was
    leased to us inside our own transaction and no message carries it, so nothing can
    deliver it twice, and recording its result would be one more row per stage for a
    replay that cannot happen. (If the hand-off was dropped, the job is keyed as usual.)"""
    return None if job.id in kernel.deps.chains else job_idempotency_key(job)


class _Held:
    """The job whose lease a chain's one heartbeat task extends: the one executing now
    (a chained stage takes over from the stage before it in the same call)."""

    __slots__ = ("base", "job", "worker_id")

    def __init__(self, job: Job, base: Any, worker_id: str) -> None:
        self.job = job
        self.base = base
        self.worker_id = worker_id

    @property
    def log(self) -> Any:
        """The job's logger, bound when something is logged: binding one per stage would
        cost a few microseconds on a path that logs nothing when all goes well."""
        return _job_log(self.base, self.job, self.worker_id)


async def _heartbeat(kernel: Kernel, held: _Held, worker_id: str, interval: float) -> None:
    """Extend the lease until cancelled. Failures are logged, never raised: a missed beat
    costs at worst a duplicate execution, which the kernel turns into a ghost result."""
    transport = kernel.deps.job_transport
    while True:
        await asyncio.sleep(interval)
        job, log = held.job, held.log
        try:
            held_now = await transport.extend_lease(job.id, worker_id, kernel.deps.clock.now())
        except Exception as exc:
            log.warning("job.heartbeat_failed", error=describe_exception(exc))
            continue
        if not held_now:
            # Someone else owns the job now (our lease was reaped), or the run was
            # cancelled (its jobs with it). The body sees ``ctx.cancelled`` so it can stop
            # early; the kernel discards its result on commit either way.
            log.warning("job.lease_lost")
            kernel.deps.inflight.cancel_job(job.id, "job no longer leased (run cancelled?)")


async def execute_job(
    kernel: Kernel,
    job: Job,
    *,
    worker_id: str,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    logger: Any = None,
    release_on_cancel: bool = True,
    chain: Callable[[], bool] | None = None,
    stopping: Callable[[], bool] | None = None,
    retries: ReleaseRetries | None = None,
    on_due: Callable[[datetime], None] | None = None,
    on_queued: Callable[[], None] | None = None,
    on_error: Callable[[Exception, str], None] | None = None,
) -> c.JobExecuteResult | None:
    """Run ``job.execute`` for a job this worker leased, heartbeating meanwhile.

    Returns the kernel's result, or ``None`` when the execution raised. Errors are logged
    and swallowed so the calling loop survives: the kernel has already released the job
    with backoff. After a raise, ``run.transition`` is dispatched as a safety net, because
    the transition that ``job.execute`` applies in its commit may not have happened.
    A successful execution already applied it, so it costs no second write transaction.

    Cancelling the call while ``stopping()`` is true (a worker's drain deadline, a Lambda
    running out of time) hands the job back with ``job.release`` (``interrupted``: the
    attempt is refunded) before the ``CancelledError`` propagates, so another worker can
    take it at once instead of after the stale-lease threshold. Any other cancellation
    (``stopping`` absent or false) releases it as ``errored``: the attempt counts, so a
    job whose execution keeps being cancelled still ends after ``max_attempts``. An
    execution that raised is released as ``errored`` too. ``retries``: where releases
    that fail (storage down) go to be retried with backoff. ``on_due``: told the time
    a result's retry or suspension falls due (``next_poll_at``), so the host wakes then;
    ``on_queued``: called when a commit queued jobs for any worker (``queued_jobs``), so
    a host with free slots dequeues them now rather than at its next poll. ``on_error``:
    told each exception the path logs and swallows, with where it was raised
    (``"execute"``, or ``"transition"`` for the safety net), so a harness can count
    transient failures and re-raise programming errors (``TestEngine``).

    ``chain``: while it returns true, each execution asks the kernel to lease the run's
    next stage to this worker in its result's commit (``JobExecute.chain``), and the
    chained job runs next in this same call, with no dequeue in between; the result
    returned is still ``job``'s own. A chained job that is not run (``chain`` turned
    false: the worker is stopping) is released at once.
    """
    if heartbeat_interval <= 0:
        raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval!r}")
    base = logger or structlog_logger("treadle.runtime")
    first: c.JobExecuteResult | None = None
    current: Job | None = job
    # One heartbeat task for the whole chain, following the job that is executing: a
    # task per stage would cost more than a no-op stage's own commit share.
    held = _Held(job, base, worker_id)
    beat = asyncio.create_task(_heartbeat(kernel, held, worker_id, heartbeat_interval))
    try:
        telemetry = kernel.deps.telemetry
        while current is not None:
            held.job = current
            if telemetry is not None and current.id not in kernel.deps.chains:
                # A dequeued job (a chained one was leased by the commit that made it
                # due: it waited for nothing).
                telemetry.job_claimed(current, kernel.deps.clock.now())
            result = await _execute_one(
                kernel,
                current,
                worker_id,
                held,
                release_on_cancel=release_on_cancel,
                chain=chain is not None and chain(),
                stopping=stopping,
                retries=retries,
                on_error=on_error,
                chained=current is not job,
            )
            if result is not None:
                if on_due is not None and result.next_poll_at is not None:
                    on_due(result.next_poll_at)  # a retry backoff or a suspension: due then
                if on_queued is not None and result.queued_jobs:
                    on_queued()  # a parallel group's other stages: take them now
            first = result if current is job else first
            current = result.chained_job if result is not None else None
            if current is not None and not (chain is not None and chain()):
                log = _job_log(base, current, worker_id)
                await _release_cancelled(
                    kernel, current, worker_id, log, error="chain stopped", retries=retries
                )
                current = None
    finally:
        beat.cancel()
        # ``wait`` (not ``await beat``) so our own cancellation still propagates.
        await asyncio.wait([beat])
    return first


def _job_log(base: Any, job: Job, worker_id: str) -> Any:
    return base.bind(
        run_id=job.workflow_run_id,
        stage_id=job.stage_id,
        worker_id=worker_id,
        job_id=job.id,
        attempt=job.attempts,
    )


async def _execute_one(
    kernel: Kernel,
    job: Job,
    worker_id: str,
    held: _Held,
    *,
    release_on_cancel: bool,
    chain: bool,
    stopping: Callable[[], bool] | None,
    retries: ReleaseRetries | None,
    on_error: Callable[[Exception, str], None] | None = None,
    chained: bool = False,
) -> c.JobExecuteResult | None:
    result: c.JobExecuteResult | None = None
    try:
        result = await kernel.dispatch(_command(kernel, job, worker_id, chain, chained))
    except asyncio.CancelledError:
        log = held.log
        if release_on_cancel:
            if stopping is not None and stopping():
                await _release_cancelled(kernel, job, worker_id, log, retries=retries)
            else:
                # Not the host stopping: something else cancelled this execution. The
                # attempt counts, so it cannot come round forever.
                await _release_cancelled(
                    kernel,
                    job,
                    worker_id,
                    log,
                    reason="errored",
                    error="execution cancelled outside the worker's shutdown",
                    retries=retries,
                )
        raise
    except Exception as exc:
        log = held.log
        log.error("job.execute_failed", error=describe_exception(exc), exc_info=True)
        if on_error is not None:
            on_error(exc, "execute")
        # The kernel released the job in its own error path, unless storage failed
        # there too: this release is a no-op after the first, and retried if it fails.
        await _release(
            kernel,
            release_command(job, worker_id, "errored", describe_exception(exc)),
            log,
            retries,
        )
    if result is None:
        try:
            await kernel.dispatch(c.RunTransition(workflow_run_id=job.workflow_run_id))
        except Exception as exc:
            held.log.error("job.transition_failed", error=describe_exception(exc))
            if on_error is not None:
                on_error(exc, "transition")
    # A success logs nothing here: the kernel logs each stage's outcome (``stage.*``).
    return result


def _command(kernel: Kernel, job: Job, worker_id: str, chain: bool, chained: bool) -> c.JobExecute:
    """The ``job.execute`` of ``job``. A chained job's is built with ``construct``: its id
    is the kernel's own (the previous commit leased it) and ``worker_id`` passed the
    validation of the call's first command, so pydantic would check nothing new, on every
    stage after the first."""
    values = {
        "job_id": job.id,
        "worker_id": worker_id,
        "idempotency_key": _delivery_key(kernel, job),
        "chain": chain,
    }
    return construct(c.JobExecute, values) if chained else c.JobExecute(**values)


def release_command(
    job: Job, worker_id: str, reason: Literal["interrupted", "errored"], error: str | None
) -> c.JobRelease:
    """The ``job.release`` of ``job``'s current lease (its ``attempts``)."""
    return c.JobRelease(
        job_id=job.id, worker_id=worker_id, attempt=job.attempts, reason=reason, error=error
    )


async def _release(
    kernel: Kernel, command: c.JobRelease, log: Any, retries: ReleaseRetries | None
) -> bool:
    """Dispatch ``command``; if storage refuses, hand it to ``retries`` (when given)."""
    try:
        result = await kernel.dispatch(command)
    except Exception as exc:
        if retries is not None:
            retries.add(command)
            log.warning("job.release_failed", error=describe_exception(exc), will_retry=True)
        else:  # storage down: the lease expires and lease.reapStale releases it
            log.error("job.release_failed", error=describe_exception(exc), will_retry=False)
        return False
    log.info("job.released" if result.released else "job.release_skipped", reason=command.reason)
    return result.released


async def _release_cancelled(
    kernel: Kernel,
    job: Job,
    worker_id: str,
    log: Any,
    *,
    reason: Literal["interrupted", "errored"] = "interrupted",
    error: str = "execution cancelled",
    retries: ReleaseRetries | None = None,
) -> None:
    """``job.release`` for an execution being cancelled: shielded, so a second cancel
    (an impatient caller) leaves the release running, and bounded by ``RELEASE_TIMEOUT``."""
    command = release_command(job, worker_id, reason, error)
    release = asyncio.ensure_future(_release(kernel, command, log, retries))
    try:
        await asyncio.wait_for(asyncio.shield(release), RELEASE_TIMEOUT)
    except asyncio.CancelledError:
        log.warning("job.release_interrupted")
    except TimeoutError:  # storage hangs: the lease expires and reapStale releases it
        log.error("job.release_failed", error="timed out", will_retry=False)


async def release_job(
    kernel: Kernel, job: Job, *, worker_id: str, reason: str = "worker shutting down"
) -> bool:
    """Hand a leased job back to the queue, available now, for another worker to run.

    For a host that gives a job up without a verdict (a drain that ran out of time, a
    Lambda invocation near its end, a job dequeued as the worker stopped): the attempt
    is refunded and there is no backoff, since the stage did not fail. It dispatches
    ``job.release``, which acts only while ``worker_id`` still holds this attempt's
    lease, so a job that committed or moved on meanwhile is left alone (returns
    ``False``). A stage left RUNNING goes back to PENDING with a ``stage:failed`` event
    (``will_retry=True``), so the run's history shows the interrupted attempt. Storage
    errors propagate (``release_command`` builds the command to retry)."""
    result = await kernel.dispatch(release_command(job, worker_id, "interrupted", reason))
    return result.released
