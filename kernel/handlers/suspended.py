"""``stage.pollSuspended``: check due suspended stages and resume, reschedule or fail them.

Completion checks call external systems, so they run outside any transaction;
each stage's outcome then commits in its own short transaction, guarded by the
stage's version so two pollers never both resume one stage. A check that raises is
tried again at the next poll, counted on the stage (``check_failures``, stored, so the
bound holds across restarts); the stage's ``max_check_failures``-th in a row fails it.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import treadle.kernel.commands as c
from treadle.kernel.ai import AICall, AITotals, marked_failed
from treadle.kernel.context import StageContext
from treadle.kernel.definitions import (
    DEFAULT_MAX_CHECK_FAILURES,
    BatchStageDefinition,
    Failed,
    NotReady,
    Ready,
    StageDefinition,
    WorkflowDefinition,
)
from treadle.kernel.deps import Scope
from treadle.kernel.errors import (
    NonRetryableError,
    NotFoundError,
    OutputValidationError,
    SuspendTimeoutError,
    describe_exception,
    short_traceback,
)
from treadle.kernel.events import EventBase, StageCompleted, StageFailed
from treadle.kernel.handlers.common import apply_transition, outputs_of
from treadle.kernel.handlers.effects import read_ai_totals
from treadle.kernel.handlers.execution import validate_output
from treadle.kernel.handlers.runs import cancel
from treadle.kernel.handlers.workflows import fire_timers
from treadle.kernel.model import MissingPayload, Run, RunStatus, StageRun, StageStatus, evolve
from treadle.kernel.workflows import deadline

if TYPE_CHECKING:
    from collections.abc import Sequence

    from treadle.kernel.deps import Deps
    from treadle.kernel.handlers.execution import Started
    from treadle.kernel.workflows.model import Timer


class _NoRuntime:
    """Checks run outside a job: progress and heartbeats are no-ops, blobs still work."""

    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    def report_progress(self, fraction: float, message: str | None) -> None:
        return None

    def heartbeat(self) -> None:
        return None

    async def put_blob(self, key: str, data: bytes) -> None:
        await self._deps.blob_store.put(key, data)

    async def get_blob(self, key: str) -> bytes:
        return await self._deps.blob_store.get(key)

    async def has_blob(self, key: str) -> bool:
        return await self._deps.blob_store.has(key)

    async def list_blobs(self, prefix: str) -> list[str]:
        return await self._deps.blob_store.list(prefix)

    async def ai_totals(self, run_id: str) -> AITotals | None:
        return await read_ai_totals(self._deps, run_id)


async def poll_suspended(
    deps: Deps, cmd: c.StagePollSuspended, scope: Scope
) -> c.StagePollSuspendedResult:
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.StagePollSuspendedResult", cached)
        timeouts = await deadline.due(tx, now, cmd.max_checks)
        due = await tx.stages.due_suspended(now, cmd.max_checks)
        runs: dict[str, Run] = {}
        stages_of: dict[str, list[StageRun]] = {}
        for stage in due:
            if stage.workflow_run_id not in runs:
                run = await tx.runs.get(stage.workflow_run_id)
                if run is not None:
                    runs[run.id] = run
                    found = deps.find_workflow(run.workflow_id, run.workflow_version)
                    if found is None or found.kind != "code":  # a check's context needs them
                        stages_of[run.id] = await tx.stages.for_run(run.id)
    # Execution timeouts first: a timed-out run is cancelled, not woken (its due stage,
    # if any, is then skipped as terminal).
    timed_out = await _fire_execution_timeouts(deps, timeouts, now) if timeouts else []
    checked = resumed = failed = 0
    resumed_ids: list[str] = []
    chained: list[Started] = []
    worker_id = cmd.worker_id
    budget = cmd.chain if worker_id is not None and deps.chains.allows(worker_id) else 0
    for stage in due:
        run = runs.get(stage.workflow_run_id)
        wf = deps.find_workflow(run.workflow_id, run.workflow_version) if run is not None else None
        if run is None or wf is None:
            continue
        checked += 1
        if wf.kind == "code":  # a suspended code workflow waits on timers, not a check
            lease_to = worker_id if budget > len(chained) else None
            outcome, started = await fire_timers(deps, scope, wf, stage, now, lease_to=lease_to)
            if started is not None and worker_id is not None:  # committed: hand it over
                deps.chains.keep(started.job.id, worker_id, started)
                chained.append(started)
        else:
            calls: list[AICall] = []
            verdict = await _check(deps, wf, run, stage, stages_of[run.id], now, calls)
            outcome = await _commit(deps, scope, wf, stage, verdict, now, calls)
        if outcome == "resumed":
            resumed += 1
            if run.id not in resumed_ids:
                resumed_ids.append(run.id)
        elif outcome == "failed":
            failed += 1
    result = c.StagePollSuspendedResult(
        checked=checked,
        resumed=resumed,
        failed=failed,
        resumed_workflow_run_ids=resumed_ids,
        timed_out_workflow_run_ids=timed_out,
        chained_jobs=[s.job for s in chained],
    )
    async with deps.persistence.transaction() as tx:
        await scope.complete(tx, result)
    return result


@dataclass(frozen=True)
class _Raised:
    """The check raised ``error`` (``Type: message``); ``limit`` such checks in a row
    fail the stage."""

    error: str
    limit: int
    traceback: str | None = None
    """Where the check raised it (user frames only), kept if the stage fails of it."""


_Verdict = Ready | NotReady | Failed | _Raised


def _max_check_failures(definition: StageDefinition) -> int:
    if isinstance(definition, BatchStageDefinition):
        return definition.max_check_failures
    return DEFAULT_MAX_CHECK_FAILURES


async def _check(
    deps: Deps,
    wf: WorkflowDefinition,
    run: Run,
    stage: StageRun,
    stages: list[StageRun],
    now: datetime,
    calls: list[AICall],
) -> _Verdict:
    """The check's verdict; the AI calls it recorded (``ctx.ai``) are put in ``calls``."""
    if stage.suspend_deadline is not None and now >= stage.suspend_deadline:
        err = SuspendTimeoutError(
            f"stage {stage.stage_id!r} was not ready within its max_wait "
            f"(deadline {stage.suspend_deadline.isoformat()})"
        )
        return Failed(message=describe_exception(err))
    definition = wf.stage(stage.stage_id)
    if definition is not None and definition.remote:
        # A remote stage suspended by ``job.suspend``: its check is the remote body itself,
        # leased again with ``resume_state`` (``docs/remote-workers.md``).
        return Ready()
    check = getattr(definition, "check_fn", None)
    if definition is None or check is None:
        return Failed(message=f"stage {stage.stage_id!r} has no check_completion function")
    if type(stage.suspended_state) is MissingPayload:  # offloaded, and its blob is gone
        return Failed(message=describe_exception(stage.suspended_state.error()))
    config = None
    if definition.config_model is not None:
        config = definition.config_model.model_validate(run.config.get(stage.stage_id, {}))
    ctx: StageContext[Any, Any] = StageContext(
        input=None,
        config=config,
        run_id=run.id,
        workflow_id=run.workflow_id,
        stage_id=stage.stage_id,
        attempt=stage.attempt,
        idempotency_key=f"{run.id}:{stage.stage_id}",
        outputs=outputs_of(stages),
        workflow=wf,
        runtime=_NoRuntime(deps),
        now=deps.clock.now,
        resume_state=stage.suspended_state,
        ai=deps.ai,
    )
    try:
        # A copy: the check must not mutate stored state outside a transaction.
        verdict = check(copy.deepcopy(stage.suspended_state), ctx)
        if inspect.isawaitable(verdict):
            verdict = await verdict
    except NonRetryableError as exc:
        calls.extend(ctx.ai.calls if ctx.ai_calls is not None else ())
        return Failed(describe_exception(exc))
    except Exception as exc:
        # A flaky status endpoint is not a failed batch: try again next interval, up to
        # the stage's bound on failed checks in a row (counted in ``_commit``).
        limit = _max_check_failures(definition)
        deps.logger.warning(
            "stage.check_failed",
            run_id=run.id,
            stage_id=stage.stage_id,
            error=describe_exception(exc),
            failures=stage.check_failures + 1,
            max_check_failures=limit,
        )
        calls.extend(ctx.ai.calls if ctx.ai_calls is not None else ())
        return _Raised(describe_exception(exc), limit, short_traceback(exc))
    if ctx.ai_calls is not None:
        calls.extend(ctx.ai_calls.calls)
    if not isinstance(verdict, Ready | NotReady | Failed):
        return Failed(
            message=f"check_completion of {stage.stage_id!r} returned {verdict!r}, "
            "expected Ready, NotReady or Failed"
        )
    if isinstance(verdict, Ready) and verdict.output is not None:
        try:
            return Ready(output=validate_output(definition, verdict.output))
        except OutputValidationError as exc:
            return Failed(message=describe_exception(exc))
    return verdict


async def _commit(
    deps: Deps,
    scope: Scope,
    wf: WorkflowDefinition,
    seen: StageRun,
    verdict: _Verdict,
    now: datetime,
    calls: Sequence[AICall] = (),
) -> str:
    async with deps.persistence.transaction() as tx:
        stage = await tx.stages.get(seen.workflow_run_id, seen.stage_id)
        run = await tx.runs.get(seen.workflow_run_id, for_update=True)
        skipped = (
            stage is None
            or run is None
            or run.status.terminal
            or stage.status is not StageStatus.SUSPENDED
            or stage.version != seen.version
        )
        if calls:  # the check's AI calls were paid for, whatever its verdict
            lost = skipped or isinstance(verdict, Failed | _Raised)
            await tx.ai_calls.record(marked_failed(calls) if lost else calls)
        if skipped:
            return "skipped"  # another poller or a cancel got there first
        assert stage is not None
        assert run is not None
        events: list[EventBase] = []
        outcome = "resumed"
        transport = deps.job_transport
        failures = 0
        trace: str | None = None
        if isinstance(verdict, _Raised):
            failures = stage.check_failures + 1
            if failures >= verdict.limit:
                trace = verdict.traceback
                verdict = Failed(
                    f"check_completion of stage {stage.stage_id!r} raised {failures} "
                    f"time(s) in a row; the last: {verdict.error}"
                )
        if isinstance(verdict, NotReady | _Raised):
            interval = (
                verdict.poll_interval if isinstance(verdict, NotReady) else None
            ) or stage.poll_interval
            next_poll = now + interval if interval is not None else now
            await tx.stages.update(
                evolve(stage, {"next_poll_at": next_poll, "check_failures": failures})
            )
            if stage.job_id:
                await transport.suspend(tx, stage.job_id, next_poll)
            return "waiting"
        if isinstance(verdict, Failed):
            outcome = "failed"
            await tx.stages.update(
                evolve(
                    stage,
                    {
                        "status": StageStatus.FAILED,
                        "error": verdict.message,
                        "error_traceback": trace,
                        "retryable": False,
                        "completed_at": now,
                        "next_poll_at": None,
                        "check_failures": failures,
                    },
                )
            )
            if stage.job_id:
                await transport.fail(tx, stage.job_id, verdict.message)
            events.append(
                StageFailed(
                    workflow_run_id=run.id,
                    timestamp=now,
                    causation_id=scope.causation_id,
                    stage_id=stage.stage_id,
                    attempt=stage.attempt,
                    error=verdict.message,
                    traceback=trace,
                )
            )
        elif verdict.output is not None:
            await tx.stages.update(
                evolve(
                    stage,
                    {
                        "status": StageStatus.COMPLETED,
                        "output": verdict.output,
                        "completed_at": now,
                        "next_poll_at": None,
                        "suspended_state": None,
                    },
                )
            )
            if stage.job_id:
                await transport.complete(tx, stage.job_id)
            events.append(
                StageCompleted(
                    workflow_run_id=run.id,
                    timestamp=now,
                    causation_id=scope.causation_id,
                    stage_id=stage.stage_id,
                    attempt=stage.attempt,
                    output=verdict.output,
                    duration=now - stage.started_at if stage.started_at else None,
                )
            )
        else:
            # Ready without output: run the body again; it reads ctx.resume_state.
            await tx.stages.update(
                evolve(
                    stage,
                    {
                        "status": StageStatus.PENDING,
                        "resume_state": stage.suspended_state,
                        "next_poll_at": None,
                        "check_failures": 0,
                    },
                )
            )
            if stage.job_id:
                await transport.requeue(tx, stage.job_id, now)
        if run.status is RunStatus.SUSPENDED:
            run = await tx.runs.update(
                evolve(run, {"status": RunStatus.RUNNING, "updated_at": now})
            )
        await tx.outbox.append(events)
        await apply_transition(
            deps, tx, run, await tx.stages.for_run(run.id), wf, now, scope.causation_id
        )
    return outcome


async def _fire_execution_timeouts(deps: Deps, due: Sequence[Timer], now: datetime) -> list[str]:
    """Cancel the runs of these due execution timeouts; returns the runs cancelled.
    The cancel commits before the timer is marked fired, so a crash in between only
    repeats a cancel, which a terminal run answers with ``cancelled=False``. (Here, not in
    ``workflows/deadline``: it dispatches ``run.cancel``, a handler above that module.)"""
    cancelled: list[str] = []
    for timer in due:
        cmd = c.RunCancel(workflow_run_id=timer.workflow_run_id, reason=deadline.REASON)
        try:
            result = await cancel(deps, cmd, Scope(deps, cmd, phased=False))
        except NotFoundError:  # the run is gone: only the timer is left to discard
            result = c.RunCancelResult(cancelled=False)
        if result.cancelled:
            cancelled.append(timer.workflow_run_id)
            deps.logger.info("run.execution_timeout", run_id=timer.workflow_run_id)
        async with deps.persistence.transaction() as tx:
            await tx.timers.fire(timer.workflow_run_id, timer.name, timer.occurrence, now)
    return cancelled
