"""The one job path every host shares: execute a leased job while heartbeating it.

The worker loop, the serverless ``handle_job`` and the Lambda SQS handler all
run a dequeued job through ``execute_job``, so lease keeping, the per-attempt
idempotency key and the recovery after a failed execution live in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from treadle.adapters.logging import structlog_logger
from treadle.kernel import commands as c
from treadle.kernel.errors import describe_exception
from treadle.kernel.events import StageFailed
from treadle.kernel.model import JobStatus, StageStatus, evolve

if TYPE_CHECKING:
    from treadle.kernel.kernel import Kernel
    from treadle.kernel.model import Job

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

    __slots__ = ("job", "log")

    def __init__(self, job: Job, log: Any) -> None:
        self.job = job
        self.log = log


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
) -> c.JobExecuteResult | None:
    """Run ``job.execute`` for a job this worker leased, heartbeating meanwhile.

    Returns the kernel's result, or ``None`` when the execution raised. Errors are logged
    and swallowed so the calling loop survives: the kernel has already released the job
    with backoff. After a raise, ``run.transition`` is dispatched as a safety net, because
    the transition that ``job.execute`` applies in its commit may not have happened.
    A successful execution already applied it, so it costs no second write transaction.

    Cancelling the call (a worker's drain deadline, a Lambda running out of time) hands
    the job back with ``release_job`` before the ``CancelledError`` propagates, so another
    worker can take it at once instead of after the stale-lease threshold.

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
    held = _Held(job, base)
    beat = asyncio.create_task(_heartbeat(kernel, held, worker_id, heartbeat_interval))
    try:
        while current is not None:
            held.job = current
            held.log = log = _job_log(base, current, worker_id)
            result = await _execute_one(
                kernel,
                current,
                worker_id,
                log,
                release_on_cancel=release_on_cancel,
                chain=chain is not None and chain(),
            )
            first = result if current is job else first
            current = result.chained_job if result is not None else None
            if current is not None and not (chain is not None and chain()):
                log = _job_log(base, current, worker_id)
                await _release_cancelled(kernel, current, worker_id, log, reason="chain stopped")
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
    log: Any,
    *,
    release_on_cancel: bool,
    chain: bool,
) -> c.JobExecuteResult | None:
    result: c.JobExecuteResult | None = None
    try:
        result = await kernel.dispatch(
            c.JobExecute(
                job_id=job.id,
                worker_id=worker_id,
                idempotency_key=_delivery_key(kernel, job),
                chain=chain,
            )
        )
    except asyncio.CancelledError:
        if release_on_cancel:
            await _release_cancelled(kernel, job, worker_id, log)
        raise
    except Exception as exc:
        log.error("job.execute_failed", error=describe_exception(exc), exc_info=True)
    if result is None:
        try:
            await kernel.dispatch(c.RunTransition(workflow_run_id=job.workflow_run_id))
        except Exception as exc:
            log.error("job.transition_failed", error=describe_exception(exc))
    else:
        log.debug("job.executed", outcome=result.outcome, ghost=result.ghost)
    return result


async def _release_cancelled(
    kernel: Kernel, job: Job, worker_id: str, log: Any, *, reason: str = "execution cancelled"
) -> None:
    """``release_job`` for an execution being cancelled: shielded, so a second cancel
    (an impatient caller) leaves the release running, and bounded by ``RELEASE_TIMEOUT``."""
    release = asyncio.ensure_future(release_job(kernel, job, worker_id=worker_id, reason=reason))
    try:
        released = await asyncio.wait_for(asyncio.shield(release), RELEASE_TIMEOUT)
    except asyncio.CancelledError:
        log.warning("job.release_interrupted")
        return
    except Exception as exc:  # storage down: the lease expires and reapStale releases it
        log.error("job.release_failed", error=describe_exception(exc))
        return
    log.info("job.released" if released else "job.release_skipped")


async def release_job(
    kernel: Kernel, job: Job, *, worker_id: str, reason: str = "worker shutting down"
) -> bool:
    """Hand a leased job back to the queue, available now, for another worker to run.

    For a worker that gives a job up without a verdict (a drain that ran out of time, a
    Lambda invocation near its end, a job dequeued as the worker stopped): no backoff,
    since the stage did not fail. It acts only while ``worker_id`` still holds this
    attempt's lease, so a job that committed or moved on meanwhile is left alone
    (returns ``False``). A stage left RUNNING goes back to PENDING with a
    ``stage:failed`` event (``will_retry=True``), as ``lease.reapStale`` records an
    expired lease, so the run's history shows the interrupted attempt.
    """
    deps = kernel.deps
    deps.chains.forget(job.id)  # a chained start handed to us that will not run now
    now = deps.clock.now()
    message = f"released: worker {worker_id!r} stopped before the stage finished ({reason})"
    async with deps.persistence.transaction() as tx:
        current = await deps.job_transport.get(tx, job.id)
        if (
            current is None
            or current.status is not JobStatus.LEASED
            or current.worker_id != worker_id
            or current.attempts != job.attempts
        ):
            return False
        await deps.job_transport.requeue(tx, job.id, now, error=message)
        stage = await tx.get_stage(job.workflow_run_id, job.stage_id)
        if stage is not None and stage.status is StageStatus.RUNNING:
            await tx.update_stage(
                evolve(stage, {"status": StageStatus.PENDING, "error": message, "retryable": True})
            )
            await tx.append_events(
                [
                    StageFailed(
                        workflow_run_id=job.workflow_run_id,
                        timestamp=now,
                        stage_id=job.stage_id,
                        attempt=stage.attempt,
                        error=message,
                        will_retry=True,
                        retry_at=now,
                    )
                ]
            )
    return True
