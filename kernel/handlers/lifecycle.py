"""``run.pause``, ``run.resume`` and ``run.terminate``: steering a live run by hand.

Pausing is a flag on the run (``Run.paused``), not a status: the run keeps the status
it had (a paused run is RUNNING, SUSPENDED or PENDING), and every place that would
start something new looks at the flag, under the run's lock:

* ``run.claimPending`` does not claim a paused PENDING run (storage skips it);
* ``decide`` never advances a paused run to its next group (the group in flight
  finishes; the run may still complete or fail);
* ``job.execute``'s phase 1 does not start a stage of a paused run: it *holds* the job
  (the job SUSPENDED while its stage is PENDING, the attempt given back);
* a code workflow's activation commits the step in flight and unwinds before starting
  the next one (``WorkflowContext.durable_call``); its timers due while paused are not
  fired (``fire_timers``) until the run resumes;
* ``run.reapStuck`` leaves paused runs alone.

``run.pause`` also holds the run's queued jobs at once, so no worker dequeues them.
``run.resume`` clears the flag, queues the held jobs again (at the time they were due),
applies the transition a pause held back, and wakes a suspended code workflow (a timer
that fell due meanwhile fires at the next poll; otherwise the body replays to where it
stopped or waits). Signals sent meanwhile are stored in the inbox as always and reach
the body when it goes on.

``run.terminate`` ends a run at once like ``run.cancel`` (status CANCELLED, stages
cancelled, results in flight become ghosts) but runs no saga compensations
(``Run.terminated``), and records ``workflow:terminated``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, cast

import treadle.kernel.commands as c
from treadle.kernel.errors import InvalidStateError
from treadle.kernel.events import WorkflowPaused, WorkflowResumed, WorkflowTerminated
from treadle.kernel.handlers.basics import load_run
from treadle.kernel.handlers.common import apply_transition, run_ended
from treadle.kernel.model import Job, JobStatus, Run, RunStatus, StageRun, StageStatus, evolve
from treadle.kernel.workflows.activation import wake
from treadle.kernel.workflows.deadline import forward_timers

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps, Scope
    from treadle.ports import Transaction


def _refuse_ended(run: Run, what: str) -> None:
    if run.status.terminal:
        raise InvalidStateError(
            f"cannot {what} run {run.id!r}: it is {run.status.value} (only a PENDING, "
            "RUNNING or SUSPENDED run can be paused, resumed or terminated)"
        )


def is_held(job: Job, stage: StageRun | None) -> bool:
    """A job a pause holds: SUSPENDED while its stage is not (a suspended batch stage's
    own job is SUSPENDED with it)."""
    return job.status is JobStatus.SUSPENDED and (
        stage is None or stage.status is not StageStatus.SUSPENDED
    )


async def hold_job(deps: Deps, tx: Transaction, job: Job, now: datetime) -> None:
    """Hold ``job`` of a paused run: not dequeued until ``run.resume``, due then at the
    time it was due (a retry keeps its backoff). A leased job gets its attempt back:
    its stage did not start."""
    if job.status is JobStatus.LEASED:
        await deps.job_transport.requeue(tx, job.id, now, refund_attempt=True)
    await deps.job_transport.suspend(tx, job.id, job.next_poll_at)


async def pause(deps: Deps, cmd: c.RunPause, scope: Scope) -> c.RunPauseResult:
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunPauseResult", cached)
        run = await load_run(tx, cmd.workflow_run_id)
        _refuse_ended(run, "pause")
        if run.paused:
            result = c.RunPauseResult(paused=False)
        else:
            await tx.runs.update(evolve(run, {"paused": True, "updated_at": now}))
            for job in await deps.job_transport.live_jobs(tx, run.id):
                if job.status is JobStatus.QUEUED:
                    await hold_job(deps, tx, job, now)
            await tx.outbox.append(
                [
                    WorkflowPaused(
                        workflow_run_id=run.id,
                        timestamp=now,
                        causation_id=scope.causation_id,
                        reason=cmd.reason,
                    )
                ]
            )
            result = c.RunPauseResult(paused=True)
        await scope.complete(tx, result)
    return result


async def resume(deps: Deps, cmd: c.RunResume, scope: Scope) -> c.RunResumeResult:
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunResumeResult", cached)
        run = await load_run(tx, cmd.workflow_run_id)
        _refuse_ended(run, "resume")
        if not run.paused:
            result = c.RunResumeResult(resumed=False)
        else:
            run = await tx.runs.update(evolve(run, {"paused": False, "updated_at": now}))
            await tx.outbox.append(
                [
                    WorkflowResumed(
                        workflow_run_id=run.id,
                        timestamp=now,
                        causation_id=scope.causation_id,
                        reason=cmd.reason,
                    )
                ]
            )
            requeued = await _go_on(deps, tx, run, now, scope.causation_id)
            result = c.RunResumeResult(resumed=True, requeued_jobs=requeued)
        await scope.complete(tx, result)
    return result


async def _go_on(
    deps: Deps, tx: Transaction, run: Run, now: datetime, causation_id: str | None
) -> int:
    """What a pause held back: the held jobs, a transition, a suspended body."""
    stages = await tx.stages.for_run(run.id)
    by_id = {s.stage_id: s for s in stages}
    requeued = 0
    for job in await deps.job_transport.live_jobs(tx, run.id):
        if is_held(job, by_id.get(job.stage_id)):
            await deps.job_transport.requeue(tx, job.id, max(job.next_poll_at, now))
            requeued += 1
    wf = deps.find_workflow(run.workflow_id, run.workflow_version)
    if wf is None or run.status is RunStatus.PENDING:
        return requeued  # a PENDING run is simply claimable again
    if wf.kind == "code":
        await _wake_code(deps, tx, run, stages, wf, now)
    else:
        await apply_transition(deps, tx, run, stages, wf, now, causation_id)
    return requeued


async def _wake_code(
    deps: Deps,
    tx: Transaction,
    run: Run,
    stages: list[StageRun],
    wf: WorkflowDefinition,
    now: datetime,
) -> None:
    """A suspended body goes on: a timer that fell due while paused fires at the next
    poll (``fire_timers``); otherwise a new activation replays the body to where it
    stopped (or to the wait it is in, which suspends it again)."""
    stage = next((s for s in stages if s.status is StageStatus.SUSPENDED), None)
    if stage is None:
        return
    timers = forward_timers(await tx.timers.pending(run.id))
    if timers and timers[0].fire_at <= now:
        await tx.stages.update(evolve(stage, {"next_poll_at": now}))
        return
    await wake(deps, tx, run, stage, wf, now)


async def terminate(deps: Deps, cmd: c.RunTerminate, scope: Scope) -> c.RunTerminateResult:
    """As ``run.cancel``, without compensations: the run ends now, for good."""
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunTerminateResult", cached)
        run = await load_run(tx, cmd.workflow_run_id)
        if run.status.terminal:
            result = c.RunTerminateResult(terminated=False)
        else:
            for stage in await tx.stages.for_run(run.id):
                if not stage.status.terminal:
                    await tx.stages.update(
                        evolve(stage, {"status": StageStatus.CANCELLED, "completed_at": now})
                    )
            await deps.job_transport.cancel_by_run(tx, run.id)
            reason = cmd.reason or "terminated"
            run = await tx.runs.update(
                evolve(
                    run,
                    {
                        "status": RunStatus.CANCELLED,
                        "terminated": True,
                        "paused": False,
                        "completed_at": now,
                        "updated_at": now,
                        "error": reason,
                    },
                )
            )
            await tx.outbox.append(
                [
                    WorkflowTerminated(
                        workflow_run_id=run.id,
                        timestamp=now,
                        causation_id=scope.causation_id,
                        reason=cmd.reason,
                    )
                ]
            )
            await run_ended(deps, tx, run, now, scope.causation_id)
            result = c.RunTerminateResult(terminated=True)
        await scope.complete(tx, result)
    if result.terminated:  # executions in this process see ctx.cancelled at once
        deps.inflight.cancel_run(cmd.workflow_run_id, cmd.reason or "terminated")
    return result
