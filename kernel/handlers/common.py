"""Pieces several handlers share: building jobs, loading a run, the transition table."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Literal, NamedTuple

from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import PayloadMissingError
from treadle.kernel.events import (
    EventBase,
    StageFailed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowSuspended,
)
from treadle.kernel.handlers.basics import enqueue_stages
from treadle.kernel.model import (
    Job,
    JobStatus,
    JsonValue,
    MissingPayload,
    Run,
    RunStatus,
    StageRun,
    StageStatus,
    evolve,
)
from treadle.kernel.workflows.children import run_ended as children_run_ended

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps
    from treadle.ports import Transaction

# Enum members read on every stage's path, bound once: ``StageStatus.COMPLETED`` is an
# attribute lookup through the enum metaclass (several times a global read).
_STAGE_COMPLETED = StageStatus.COMPLETED
_STAGE_SUSPENDED = StageStatus.SUSPENDED
_RUN_RUNNING = RunStatus.RUNNING
_JOB_LEASED = JobStatus.LEASED


def outputs_of(stages: Sequence[StageRun]) -> dict[str, JsonValue]:
    return {s.stage_id: s.output for s in stages if s.status is _STAGE_COMPLETED}


class LazyOutputs(Mapping[str, JsonValue]):
    """``outputs_of(stages)``, built on first use: every stage's context gets one, and
    most bodies never call ``ctx.require`` or ``ctx.optional``."""

    __slots__ = ("_outputs", "_stages")

    def __init__(self, stages: Sequence[StageRun]) -> None:
        self._stages = stages
        self._outputs: dict[str, JsonValue] | None = None

    def _built(self) -> dict[str, JsonValue]:
        if self._outputs is None:
            self._outputs = outputs_of(self._stages)
        return self._outputs

    def __getitem__(self, stage_id: str) -> JsonValue:
        return self._built()[stage_id]

    def __contains__(self, stage_id: object) -> bool:
        return stage_id in self._built()

    def get(self, stage_id: str, default: JsonValue = None) -> JsonValue:
        return self._built().get(stage_id, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())


def group_input(wf: WorkflowDefinition, stages: Sequence[StageRun], group: int) -> JsonValue:
    """``wf.group_output(group - 1, outputs_of(stages))``, the input of a stage of
    ``group`` > 0, without building every stage's outputs for the common case of a
    previous group of one stage: that stage's output if it completed, else ``None``."""
    previous = wf.groups[group - 1]
    if len(previous) != 1:
        return wf.group_output(group - 1, outputs_of(stages))
    wanted = previous[0].id
    for stage in stages:
        if stage.stage_id == wanted:
            return stage.output if stage.status is _STAGE_COMPLETED else None
    return None


def lost_input(run: Run, stages: Sequence[StageRun], stage: StageRun) -> PayloadMissingError | None:
    """The error for ``stage`` when its input (the run's, or an output of the previous
    group) or its resume state was offloaded and its blob is gone: storage read it as a
    ``MissingPayload``. ``None`` when every one is there (the common case: no loop for
    group 0, one pass over the run's stages otherwise)."""
    group = stage.execution_group
    if type(stage.resume_state) is MissingPayload:
        return stage.resume_state.error()
    if group == 0:
        return run.input.error() if type(run.input) is MissingPayload else None
    for other in stages:
        if other.execution_group == group - 1 and type(other.output) is MissingPayload:
            return other.output.error()
    return None


class Decision(NamedTuple):
    """What ``decide`` chose. A named tuple rather than a frozen dataclass: just as
    immutable, and a chained commit builds one per stage (``leased``), which a frozen
    dataclass does with an ``object.__setattr__`` per field."""

    action: Literal["advanced", "completed", "failed", "noop", "suspend"]
    next_group: int | None = None
    failed_stage: StageRun | None = None
    leased: Job | None = None
    """``advanced`` with ``lease_to``: the next group's job created leased to that worker."""


_LIVE_RUN = frozenset({RunStatus.RUNNING, RunStatus.SUSPENDED})
_FAILED = frozenset({StageStatus.FAILED, StageStatus.CANCELLED})
_SUCCEEDED = frozenset({StageStatus.COMPLETED, StageStatus.SKIPPED})
_NOOP = Decision("noop")
_COMPLETED = Decision("completed")
_SUSPEND = Decision("suspend")
_ADVANCE_TO = tuple(Decision("advanced", next_group=group) for group in range(64))
"""Shared ``advanced`` decisions by next group: every stage's commit decides."""


def decide(wf: WorkflowDefinition, run: Run, stages: Sequence[StageRun]) -> Decision:
    """The transition table. Only a stage FAILED *for good* fails the run: a stage
    waiting to retry is PENDING, so a parallel sibling's retry is never cut short."""
    if run.status not in _LIVE_RUN or run.current_group < 0:
        return _NOOP
    # One pass (this runs in every stage's commit): a failed stage anywhere wins; else
    # note whether every stage up to the current group succeeded, or all that have not
    # are suspended.
    current_group = run.current_group
    all_succeeded = True
    waiting_all_suspended = True
    for stage in stages:
        status = stage.status
        if status in _FAILED:
            return Decision("failed", failed_stage=stage)
        if stage.execution_group <= current_group and status not in _SUCCEEDED:
            all_succeeded = False
            if status is not _STAGE_SUSPENDED:
                waiting_all_suspended = False
    if all_succeeded:
        if current_group >= len(wf.groups) - 1:
            return _COMPLETED
        if run.paused:  # the next group waits for run.resume (handlers/lifecycle.py)
            return _NOOP
        next_group = current_group + 1
        if next_group < len(_ADVANCE_TO):
            return _ADVANCE_TO[next_group]
        return Decision("advanced", next_group=next_group)
    if run.status is _RUN_RUNNING and waiting_all_suspended:
        return _SUSPEND
    return _NOOP


async def apply_transition(
    deps: Deps,
    tx: Transaction,
    run: Run,
    stages: list[StageRun],
    wf: WorkflowDefinition,
    now: datetime,
    causation_id: str | None,
    *,
    lease_to: str | None = None,
    prior_events: Sequence[EventBase] = (),
    decision: Decision | None = None,
    waiting_for: str | None = None,
) -> tuple[Decision, Run]:
    """Carry out ``decide`` inside ``tx``: enqueue the next group, complete, fail, or
    mark the run suspended. Returns the decision and the updated run. ``lease_to``:
    the next group's first job is leased to that worker (``Decision.leased``).
    ``prior_events`` (the caller's, not yet appended) go first, in the same append as
    the transition's own events: one sequence allocation and one insert, not two.
    ``decision``: ``decide(wf, run, stages)`` if the caller has just computed it.
    ``waiting_for``: what a suspending run waits for (a code workflow's waits); by
    default the batch polls of its suspended stages (``batch_waits``)."""
    if decision is None:
        decision = decide(wf, run, stages)
    events: list[EventBase] = list(prior_events)
    if decision.action == "advanced":
        next_group = decision.next_group
        assert next_group is not None
        group = [s for s in stages if s.execution_group == next_group]
        run = await tx.runs.update(
            evolve(run, {"current_group": next_group, "updated_at": now, "status": _RUN_RUNNING})
        )
        jobs = await enqueue_stages(deps, tx, run, wf, group, now, lease_to=lease_to)
        if lease_to is not None and jobs and jobs[0].status is _JOB_LEASED:
            decision = Decision("advanced", next_group=next_group, leased=jobs[0])
    elif decision.action == "completed":
        output = wf.group_output(len(wf.groups) - 1, outputs_of(stages))
        run = await tx.runs.update(
            evolve(
                run,
                {
                    "status": RunStatus.COMPLETED,
                    "output": output,
                    "completed_at": now,
                    "updated_at": now,
                },
            )
        )
        events.append(
            WorkflowCompleted(
                workflow_run_id=run.id,
                timestamp=now,
                causation_id=causation_id,
                output=output,
                duration=run.duration,
            )
        )
        await run_ended(deps, tx, run, now, causation_id)
    elif decision.action == "failed":
        failed = decision.failed_stage
        assert failed is not None
        error = f"stage {failed.stage_id!r} {failed.status.value.lower()}: {failed.error or ''}"
        if events:  # fail_run appends its own events after the caller's
            await tx.outbox.append(events)
            events = []
        run = await fail_run(
            deps, tx, run, stages, error.rstrip(": "), now, causation_id, stage_id=failed.stage_id
        )
    elif decision.action == "suspend":
        run = await tx.runs.update(evolve(run, {"status": RunStatus.SUSPENDED, "updated_at": now}))
        events.append(
            WorkflowSuspended(
                workflow_run_id=run.id,
                timestamp=now,
                causation_id=causation_id,
                waiting_for=waiting_for or batch_waits(stages, run.current_group),
            )
        )
    if events:
        await tx.outbox.append(events)
    return decision, run


def batch_waits(stages: Sequence[StageRun], group: int) -> str | None:
    """What a pipeline suspended on its batch stages waits for: ``batch poll at T``, the
    earliest ``next_poll_at`` of the group's suspended stages."""
    due = [
        s.next_poll_at
        for s in stages
        if s.execution_group == group and s.status is _STAGE_SUSPENDED and s.next_poll_at
    ]
    return f"batch poll at {min(due).isoformat(timespec='seconds')}" if due else None


async def fail_run(
    deps: Deps,
    tx: Transaction,
    run: Run,
    stages: Sequence[StageRun],
    error: str,
    now: datetime,
    causation_id: str | None,
    *,
    stage_id: str | None = None,
) -> Run:
    """Terminal failure: record the error on the run, cancel whatever is still live."""
    for stage in stages:
        if not stage.status.terminal:
            await tx.stages.update(
                evolve(stage, {"status": StageStatus.CANCELLED, "completed_at": now})
            )
    await deps.job_transport.cancel_by_run(tx, run.id)
    run = await tx.runs.update(
        evolve(
            run,
            {
                "status": RunStatus.FAILED,
                "error": error,
                "completed_at": now,
                "updated_at": now,
            },
        )
    )
    await tx.outbox.append(
        [
            WorkflowFailed(
                workflow_run_id=run.id,
                timestamp=now,
                causation_id=causation_id,
                error=error,
                stage_id=stage_id,
                duration=run.duration,
            )
        ]
    )
    await run_ended(deps, tx, run, now, causation_id)
    return run


async def run_ended(
    deps: Deps, tx: Transaction, run: Run, now: datetime, causation_id: str | None
) -> None:
    """Hook for every transaction that makes a run terminal: a child run reports to its
    parent, a parent's live children are cancelled (``kernel.workflows.children``); a
    body this kernel keeps parked for the run is dropped (sticky execution)."""
    deps.sticky.evict(run.id)
    await children_run_ended(deps, tx, run, now, causation_id)


async def fail_stage_for_good(
    deps: Deps,
    tx: Transaction,
    stage: StageRun,
    job_id: str,
    message: str,
    now: datetime,
    causation_id: str | None,
    *,
    traceback: str | None = None,
) -> StageRun:
    """A stage that will not be retried: FAILED with its error (and ``traceback``, where
    the body raised it), its job failed, and a ``stage:failed`` event. Pipelines and code
    workflows share this one path."""
    stage = await tx.stages.update(
        evolve(
            stage,
            {
                "status": StageStatus.FAILED,
                "error": message,
                "error_traceback": traceback,
                "retryable": False,
                "completed_at": now,
            },
        )
    )
    await deps.job_transport.fail(tx, job_id, message)
    await tx.outbox.append(
        [
            StageFailed(
                workflow_run_id=stage.workflow_run_id,
                timestamp=now,
                causation_id=causation_id,
                stage_id=stage.stage_id,
                attempt=stage.attempt,
                error=message,
                traceback=traceback,
            )
        ]
    )
    return stage
