"""Remote execution: ``job.execute``'s phases as separate commands.

A remote worker (``docs/remote-workers.md``) runs a stage body in another process,
language or network. The host leases the job (``JobTransport.dequeue``, as for any
worker), then:

- ``job.begin`` is phase 1 (``jobs.phase_start``, the very code ``job.execute`` runs):
  the stage RUNNING, its attempt counted, ``stage:started``; the result carries the
  validated input and config, the attempt and the idempotency key;
- ``job.complete`` / ``job.fail`` / ``job.suspend`` are phase 3 (``jobs.phase_commit``):
  the output validated against the stage's model, the retry policy and backoff, the
  ghost check (a run cancelled or a lease reaped meanwhile discards the outcome and says
  ``ghost=True``), the transition to the next group, all in ``job.execute``'s commit;
- ``job.heartbeat`` extends the lease, as the in-process heartbeat does.

So leases, attempts, retries, idempotency and the ghost rule are the in-process worker's
own. Each outcome names the lease's ``attempt``: an outcome for an earlier lease of the
job (reaped after the worker went silent, leased again) is a ghost.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import treadle.kernel.commands as c
from treadle.kernel.context import CancellationToken
from treadle.kernel.definitions import Suspend
from treadle.kernel.errors import (
    JobNotFoundError,
    NonRetryableError,
    OutputValidationError,
    RemoteStageError,
)
from treadle.kernel.handlers import jobs
from treadle.kernel.handlers.execution import Started, validate_output
from treadle.kernel.model import JobStatus, JsonValue, StageStatus

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps, Scope


async def begin(deps: Deps, cmd: c.JobBegin, scope: Scope) -> c.JobBeginResult:
    try:
        started = await jobs.phase_start(deps, cmd, scope)
    except JobNotFoundError:
        raise
    except Exception as exc:
        await jobs.release_after_error(deps, _as_execute(cmd), exc)
        raise
    if isinstance(started, c.JobExecuteResult):  # a ghost, a paused run: not started
        return c.JobBeginResult(
            started=False,
            job_id=cmd.job_id,
            workflow_run_id=started.workflow_run_id,
            stage_id=started.stage_id,
            reason=started.error,
        )
    runtime = jobs.StageRuntime(deps, started, cmd.worker_id)
    ctx, failure = jobs.build_context(deps, started, runtime, CancellationToken())
    if failure is not None:  # the input does not match the stage's model: never sent out
        outcome = await jobs.phase_commit(deps, _as_execute(cmd), scope, started, None, failure)
        return c.JobBeginResult(
            started=False,
            job_id=cmd.job_id,
            workflow_run_id=started.run.id,
            stage_id=started.stage.stage_id,
            reason=outcome.error,
        )
    definition = started.definition
    value: JsonValue = None
    if definition.input_adapter is not None:
        value = definition.input_adapter.dump_python(ctx.input, mode="json")
    config: JsonValue = None
    if ctx.config is not None:
        config = ctx.config.model_dump(mode="json")
    result = c.JobBeginResult(
        started=True,
        job_id=cmd.job_id,
        workflow_run_id=started.run.id,
        workflow_id=started.run.workflow_id,
        stage_id=started.stage.stage_id,
        attempt=started.job.attempts,
        stage_attempt=started.stage.attempt,
        idempotency_key=ctx.idempotency_key,
        input=value,
        config=config,
        resume_state=started.stage.resume_state,
        trace_context=started.run.trace_context,
    )
    if scope.key is not None:
        async with deps.persistence.transaction() as tx:
            await scope.complete(tx, result)
    return result


async def complete(deps: Deps, cmd: c.JobComplete, scope: Scope) -> c.JobCompleteResult:
    async def outcome(started: Started) -> jobs.Outcome:
        try:
            return jobs.Outcome("completed", output=validate_output(started.definition, cmd.output))
        except OutputValidationError as exc:  # a wrong shape fails the stage, never retried
            return jobs.Outcome("failed", error=exc)

    return c.JobCompleteResult(**dict(await _commit(deps, cmd, scope, outcome)))


async def fail(deps: Deps, cmd: c.JobFail, scope: Scope) -> c.JobFailResult:
    message = f"{cmd.error_type}: {cmd.error}" if cmd.error_type else cmd.error
    error: Exception = RemoteStageError(message) if cmd.retryable else NonRetryableError(message)

    async def outcome(started: Started) -> jobs.Outcome:
        return jobs.Outcome("failed", error=error)

    return c.JobFailResult(**dict(await _commit(deps, cmd, scope, outcome)))


async def suspend(deps: Deps, cmd: c.JobSuspend, scope: Scope) -> c.JobSuspendResult:
    async def outcome(started: Started) -> jobs.Outcome:
        try:
            parked = Suspend(
                state=cmd.state, poll_interval=cmd.poll_interval, max_wait=cmd.max_wait
            )
        except Exception as exc:  # a state no backend can store fails the stage
            return jobs.Outcome("failed", error=NonRetryableError(str(exc)))
        return jobs.Outcome("suspended", suspend=parked)

    return c.JobSuspendResult(**dict(await _commit(deps, cmd, scope, outcome)))


async def heartbeat(deps: Deps, cmd: c.JobHeartbeat, scope: Scope) -> c.JobHeartbeatResult:
    """Extend the lease if this worker holds it at ``attempt``; say whether the run ended."""
    async with deps.persistence.transaction() as tx:
        job = await deps.job_transport.get(tx, cmd.job_id)
        if job is None:
            raise JobNotFoundError(f"no job with id {cmd.job_id!r}")
        run = await tx.runs.get(job.workflow_run_id)
    ended = run is None or run.status.terminal
    if not _holds(job, cmd):
        return c.JobHeartbeatResult(held=False, cancelled=ended)
    held = await deps.job_transport.extend_lease(cmd.job_id, cmd.worker_id, deps.clock.now())
    return c.JobHeartbeatResult(held=held, cancelled=ended)


def _holds(job: Any, cmd: c.JobComplete | c.JobFail | c.JobSuspend | c.JobHeartbeat) -> bool:
    return bool(
        job.status is JobStatus.LEASED
        and job.worker_id == cmd.worker_id
        and job.attempts == cmd.attempt
    )


def _as_execute(cmd: c.JobBegin | c.JobComplete | c.JobFail | c.JobSuspend) -> c.JobExecute:
    """The execution a remote command continues, as ``job.execute``'s phases name it."""
    return c.JobExecute(job_id=cmd.job_id, worker_id=cmd.worker_id)


async def _commit(
    deps: Deps,
    cmd: c.JobComplete | c.JobFail | c.JobSuspend,
    scope: Scope,
    outcome_of: Any,
) -> c.JobExecuteResult:
    """Phase 3 for a remote outcome: what phase 1 started, read back (under the key's
    in-progress mark), then ``jobs.phase_commit``, which re-checks ownership in its own
    transaction, so anything that happened between the two reads is still a ghost."""
    execute = _as_execute(cmd)
    now = deps.clock.now()
    started_or_ghost = await _started(deps, cmd, scope, now)
    if isinstance(started_or_ghost, c.JobExecuteResult):
        return started_or_ghost
    started = started_or_ghost
    outcome: jobs.Outcome = await outcome_of(started)
    try:
        result = await jobs.phase_commit(deps, execute, scope, started, None, outcome)
    except Exception as exc:
        await jobs.release_after_error(deps, execute, exc)
        raise
    jobs.log_outcome(deps, execute, started, result)
    return result


_KIND: dict[str, Literal["completed", "failed", "suspended"]] = {
    "job.complete": "completed",
    "job.fail": "failed",
    "job.suspend": "suspended",
}


async def _started(
    deps: Deps, cmd: c.JobComplete | c.JobFail | c.JobSuspend, scope: Scope, now: datetime
) -> Started | c.JobExecuteResult:
    kind = _KIND[cmd.type]
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        job = await deps.job_transport.get(tx, cmd.job_id)
        if job is None:
            raise JobNotFoundError(f"no job with id {cmd.job_id!r}")
        run = await tx.runs.get(job.workflow_run_id, for_update=True)
        stages = await tx.stages.for_run(job.workflow_run_id) if run is not None else []
        stage = next((s for s in stages if s.stage_id == job.stage_id), None)
        definition = None
        wf = None
        if run is not None and stage is not None:
            wf = deps.workflow(run.workflow_id, run.workflow_version)
            definition = wf.stage(stage.stage_id)
        if (
            not _holds(job, cmd)
            or run is None
            or run.status.terminal
            or stage is None
            or stage.status is not StageStatus.RUNNING
            or stage.job_id != job.id
            or wf is None
            or definition is None
        ):
            state = "missing" if run is None else run.status.value
            ghost = c.JobExecuteResult(
                outcome=kind,
                workflow_run_id=job.workflow_run_id,
                stage_id=job.stage_id,
                ghost=True,
                error=(
                    f"result discarded: run is {state}; job is {job.status.value} "
                    f"(attempt {job.attempts}), not leased by {cmd.worker_id!r} "
                    f"at attempt {cmd.attempt}"
                ),
            )
            await scope.complete(tx, ghost)
            return ghost
    return Started(job, run, stage, wf, definition, stages)
