"""The one path that ends a lease without a verdict from the stage: release or fail.

A leased job can lose its worker three ways, and each once had its own copy of
"requeue with backoff, or fail for good" (they drifted: different backoff seeds, a
missing ``stage:failed`` event, the workflow looked up without the run's pinned
version). ``settle_lease`` is now the only one:

* ``interrupted``: the host gave the job back on purpose (a worker draining on
  SIGTERM, a Lambda invocation near its deadline, a chained job that will not run).
  The attempt is refunded (``job.attempts`` and the stage's ``attempt`` go back one)
  and the job is available at once: the stage did not fail.
* ``expired``: the worker stopped heartbeating (it died); found by ``lease.reapStale``.
* ``errored``: ``job.execute`` raised outside the stage body (storage failed mid-way,
  the pinned version lacks the stage); reported by the host with ``job.release``.

The last two count the attempt: the job is requeued after the stage's retry backoff,
or, once it has used ``max_attempts``, failed together with its stage and the run
transitioned. Hosts reach this only through commands (``job.release``,
``lease.reapStale``), never through a raw transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal, cast

import treadle.kernel.commands as c
from treadle.kernel.events import StageFailed
from treadle.kernel.handlers.common import apply_transition
from treadle.kernel.model import Job, JobStatus, StageStatus, evolve
from treadle.kernel.retry import DEFAULT_RETRY

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps, Scope
    from treadle.ports import Transaction

LeaseEnd = Literal["interrupted", "expired", "errored"]
Settled = Literal["requeued", "failed"]


async def settle_lease(
    deps: Deps,
    tx: Transaction,
    job: Job,
    *,
    end: LeaseEnd,
    message: str,
    now: datetime,
    causation_id: str | None,
) -> Settled:
    """Release ``job`` (LEASED, checked by the caller) for another attempt, or fail it.

    The stage follows the job: a RUNNING stage goes back to PENDING (or FAILED when the
    job is exhausted) with a ``stage:failed`` event; a stage whose attempt never started
    (still PENDING) is failed too once its job is exhausted, else the run would wait on
    a stage with no live job. A terminal stage is left alone."""
    run = await tx.runs.get(job.workflow_run_id, for_update=True)
    wf = deps.find_workflow(run.workflow_id, run.workflow_version) if run is not None else None
    definition = wf.stage(job.stage_id) if wf is not None else None
    policy = definition.retry if definition is not None else DEFAULT_RETRY
    counted = end != "interrupted"
    exhausted = counted and job.attempts >= job.max_attempts
    if not counted:
        retry_at = now
    else:
        retry_at = now + policy.delay_for(
            job.attempts, seed=f"{job.workflow_run_id}:{job.stage_id}"
        )
    if exhausted:
        await deps.job_transport.fail(tx, job.id, message)
    else:
        await deps.job_transport.requeue(
            tx, job.id, retry_at, error=message, refund_attempt=not counted
        )
    settled: Settled = "failed" if exhausted else "requeued"
    stage = await tx.stages.get(job.workflow_run_id, job.stage_id)
    if stage is None or stage.status.terminal:
        return settled
    running = stage.status is StageStatus.RUNNING
    if not running and not exhausted:
        return settled
    changes: dict[str, object] = {
        "status": StageStatus.FAILED if exhausted else StageStatus.PENDING,
        "error": message,
        "retryable": not exhausted,
        "completed_at": now if exhausted else None,
    }
    if not counted and running and stage.job_id == job.id and stage.attempt > 0:
        changes["attempt"] = stage.attempt - 1  # the next start counts this attempt again
    await tx.stages.update(evolve(stage, changes))
    await tx.outbox.append(
        [
            StageFailed(
                workflow_run_id=job.workflow_run_id,
                timestamp=now,
                causation_id=causation_id,
                stage_id=job.stage_id,
                attempt=stage.attempt,
                error=message,
                will_retry=not exhausted,
                retry_at=None if exhausted else retry_at,
            )
        ]
    )
    if exhausted and run is not None and wf is not None:
        stages = await tx.stages.for_run(run.id)
        await apply_transition(deps, tx, run, stages, wf, now, causation_id)
    return settled


async def release(deps: Deps, cmd: c.JobRelease, scope: Scope) -> c.JobReleaseResult:
    """``job.release``: a host hands back the job it leased, without a stage verdict.

    Acts only while ``worker_id`` still holds this very attempt's lease (``attempt``),
    so a release that arrives late (retried after an outage, after the job committed,
    was reaped or was leased again) changes nothing and reports ``released=False``."""
    now = deps.clock.now()
    deps.chains.forget(cmd.job_id)  # a chained start handed to this process: it will not run
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.JobReleaseResult", cached)
        job = await deps.job_transport.get(tx, cmd.job_id)
        if (
            job is None
            or job.status is not JobStatus.LEASED
            or job.worker_id != cmd.worker_id
            or job.attempts != cmd.attempt
        ):
            result = c.JobReleaseResult(released=False)
        else:
            settled = await settle_lease(
                deps,
                tx,
                job,
                end=cmd.reason,
                message=_message(cmd),
                now=now,
                causation_id=scope.causation_id,
            )
            result = c.JobReleaseResult(released=True, outcome=settled)
        await scope.complete(tx, result)
    return result


def _message(cmd: c.JobRelease) -> str:
    if cmd.reason == "interrupted":
        detail = f" ({cmd.error})" if cmd.error else ""
        return f"released: worker {cmd.worker_id!r} stopped before the stage finished{detail}"
    return f"execution failed on worker {cmd.worker_id!r}: {cmd.error or 'unknown error'}"
