"""Version pinning of code workflow runs.

A run records the version it started under (``Run.workflow_version``). Replaying a
journal under other code could take other paths over old state, so an activation
whose registry lacks the pinned version does not run the body: the run is *blocked*,
not failed. Its journal is untouched; run and stage are SUSPENDED with the
``VersionMismatchError`` in ``error`` (what ``engine.get_run`` shows), a
``version:mismatched`` event is recorded, and the stage's ``next_poll_at`` makes the
maintenance tick re-check it every ``KernelSettings.version_recheck_interval``. The
first tick of a worker that registers the pinned version resumes the run.

A cancelled run whose compensations are pending (``saga.compensate_on_cancel``) stays
CANCELLED: its compensating activation is queued again after the re-check interval
instead, the mismatch appended once to its ``error``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from treadle.kernel.errors import VersionMismatchError, describe_exception
from treadle.kernel.events import EventBase, VersionMismatched, WorkflowSuspended
from treadle.kernel.model import Run, RunStatus, StageRun, StageStatus, evolve

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps
    from treadle.ports import Transaction

_PREFIX = VersionMismatchError.__name__


def version_mismatch(run: Run, wf: WorkflowDefinition) -> VersionMismatchError | None:
    """The error if ``wf`` (what this registry resolved) is not the run's pinned version."""
    if wf.version == run.workflow_version:
        return None
    return VersionMismatchError(
        f"run {run.id!r} of workflow {run.workflow_id!r} is pinned to version "
        f"{run.workflow_version!r}, but this worker registers version {wf.version!r} only; "
        f"the run is blocked (journal intact) until a worker that registers version "
        f"{run.workflow_version!r} picks it up"
    )


def mismatch_event(
    run: Run, wf: WorkflowDefinition, message: str, now: datetime, causation_id: str | None
) -> VersionMismatched:
    return VersionMismatched(
        workflow_run_id=run.id,
        timestamp=now,
        causation_id=causation_id,
        workflow_id=run.workflow_id,
        pinned_version=run.workflow_version,
        registered_version=wf.version,
        error=message,
    )


def is_blocked(stage: StageRun) -> bool:
    """Whether a suspended code-workflow stage is blocked by a version mismatch."""
    return stage.status is StageStatus.SUSPENDED and (stage.error or "").startswith(_PREFIX)


async def block(
    deps: Deps,
    tx: Transaction,
    run: Run,
    stage: StageRun,
    wf: WorkflowDefinition,
    error: VersionMismatchError,
    now: datetime,
    causation_id: str | None,
) -> StageRun:
    """Suspend run and stage with ``error`` and schedule the next re-check. The event is
    recorded when the run becomes blocked, not on every re-check."""
    message = describe_exception(error)
    first = stage.error != message or run.error != message
    stage = await tx.stages.update(
        evolve(
            stage,
            {
                "status": StageStatus.SUSPENDED,
                "error": message,
                "next_poll_at": now + deps.settings.version_recheck_interval,
                "suspend_deadline": None,
                "job_id": None,
            },
        )
    )
    if not first:
        return stage
    events: list[EventBase] = [mismatch_event(run, wf, message, now, causation_id)]
    if run.status is not RunStatus.SUSPENDED:
        events.append(
            WorkflowSuspended(
                workflow_run_id=run.id,
                timestamp=now,
                causation_id=causation_id,
                waiting_for=f"a worker with version {run.workflow_version!r}",
            )
        )
    await tx.runs.update(
        evolve(run, {"status": RunStatus.SUSPENDED, "error": message, "updated_at": now})
    )
    await tx.outbox.append(events)
    deps.logger.warning(
        "workflow.version_mismatch",
        run_id=run.id,
        workflow_id=run.workflow_id,
        pinned_version=run.workflow_version,
        registered_version=wf.version,
    )
    return stage
