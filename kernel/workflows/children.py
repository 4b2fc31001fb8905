"""Child runs: created with their parent's ``child`` journal entry, reported back to the
parent when they end, and cancelled when their parent ends first.

The parent's ``child`` entry (``input``: ``child_run_id``, ``workflow_id``) stays
WAITING exactly as long as the child run is not terminal: ``run_ended`` runs inside
every transaction that ends a run (completion, failure, cancel, a stuck run reaped), and
in that same transaction it

* completes the parent's entry with the child's outcome (``status`` and ``output`` or
  ``error``), records ``child:finished`` on the parent and wakes the parent if it is
  suspended (as a signal does);
* cancels every child the ending run still waits for, recursively, so no child outlives
  its parent (whether the parent completed, failed or was cancelled).

Lock order: a run's transaction locks the run, then its parent (to report) or its
children (to cancel them). Two such transactions crossing (a child ending while its
parent is being cancelled) can deadlock on PostgreSQL; the database aborts one, which
surfaces as a retryable ``TransientStorageError`` and is retried like any other.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from treadle.kernel.events import (
    ChildFinished,
    WorkflowCancelled,
    WorkflowCreated,
    WorkflowStarted,
)
from treadle.kernel.handlers.basics import insert_started
from treadle.kernel.model import Run, RunStatus, StageStatus, evolve
from treadle.kernel.workflows.activation import wake, write_entries
from treadle.kernel.workflows.definition import WORKFLOW_STAGE_ID
from treadle.kernel.workflows.model import ChildStart, JournalStatus
from treadle.kernel.workflows.saga import compensate_on_cancel

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps
    from treadle.ports import Transaction


async def start_child(
    deps: Deps,
    tx: Transaction,
    parent: Run,
    spec: ChildStart,
    now: datetime,
    causation_id: str | None,
) -> Run:
    """Insert the child run inside the transaction that journals the parent's ``child``
    entry (input and config already validated), and start it at once: the rows and events
    of ``run.create`` and of ``run.claimPending`` together, so the child is RUNNING with
    its first jobs queued and does not wait for the next claim of PENDING runs."""
    wf = deps.workflow(spec.workflow_id)
    run = Run(
        id=spec.run_id,
        workflow_id=wf.id,
        workflow_version=wf.version,
        input=spec.input,
        config=spec.config,
        priority=parent.priority,
        parent_run_id=parent.id,
        trace_context=parent.trace_context,  # a child joins its parent's trace
        status=RunStatus.RUNNING,
        current_group=0,
        created_at=now,
        started_at=now,
        updated_at=now,
    )
    await insert_started(deps, tx, run, wf, now)
    await tx.outbox.append(
        [
            WorkflowCreated(
                workflow_run_id=run.id,
                timestamp=now,
                causation_id=causation_id,
                workflow_id=wf.id,
                priority=run.priority,
            ),
            WorkflowStarted(
                workflow_run_id=run.id,
                timestamp=now,
                causation_id=causation_id,
                workflow_id=wf.id,
            ),
        ]
    )
    return run


async def run_ended(
    deps: Deps, tx: Transaction, run: Run, now: datetime, causation_id: str | None
) -> None:
    """Called with ``run`` just made terminal, inside that transaction (module docstring)."""
    wf = deps.find_workflow(run.workflow_id, run.workflow_version)
    if wf is not None and wf.kind == "code":
        reason = f"parent run {run.id!r} ended {run.status.value}"
        for entry in await tx.journal.entries(run.id, status=JournalStatus.WAITING):
            if entry.kind == "child":
                child_id = str((entry.input or {}).get("child_run_id"))
                await cancel_run(deps, tx, child_id, reason, now, causation_id)
    if run.parent_run_id is not None:
        await _report_to_parent(deps, tx, run, now, causation_id)


async def cancel_run(
    deps: Deps,
    tx: Transaction,
    run_id: str,
    reason: str,
    now: datetime,
    causation_id: str | None,
) -> bool:
    """Cancel a child run (and, through ``run_ended``, its own children) as ``run.cancel``
    does: the run and its live stages CANCELLED, its jobs cancelled, a saga's pending
    compensations queued. ``False`` if it had already ended. (An execution of it running
    in this process is not signalled through ``ctx.cancelled``; its next commit finds the
    run cancelled and is discarded as a ghost.)"""
    run = await tx.runs.get(run_id, for_update=True)
    if run is None or run.status.terminal:
        return False
    for stage in await tx.stages.for_run(run.id):
        if not stage.status.terminal:
            await tx.stages.update(
                evolve(stage, {"status": StageStatus.CANCELLED, "completed_at": now})
            )
    await deps.job_transport.cancel_by_run(tx, run.id)
    await compensate_on_cancel(deps, tx, run, now)  # a saga's compensations still run
    run = await tx.runs.update(
        evolve(
            run,
            {
                "status": RunStatus.CANCELLED,
                "completed_at": now,
                "updated_at": now,
                "error": reason,
            },
        )
    )
    await tx.outbox.append(
        [
            WorkflowCancelled(
                workflow_run_id=run.id, timestamp=now, causation_id=causation_id, reason=reason
            )
        ]
    )
    await run_ended(deps, tx, run, now, causation_id)
    return True


async def _report_to_parent(
    deps: Deps, tx: Transaction, child: Run, now: datetime, causation_id: str | None
) -> None:
    assert child.parent_run_id is not None
    parent = await tx.runs.get(child.parent_run_id, for_update=True)
    if parent is None:
        return
    waiting = [
        e
        for e in await tx.journal.entries(parent.id, status=JournalStatus.WAITING)
        if e.kind == "child" and (e.input or {}).get("child_run_id") == child.id
    ]
    if not waiting:
        return  # started by run.create with parent_run_id, or a race loser already settled
    entry = waiting[0]
    result: dict[str, object] = {"child_run_id": child.id, "status": child.status.value}
    if child.status is RunStatus.COMPLETED:
        result["output"] = child.output
    else:
        result["error"] = child.error
    done = entry.model_copy(
        update={"status": JournalStatus.COMPLETED, "result": result, "completed_at": now}
    )
    await write_entries(tx, [done], now)
    if parent.status.terminal:
        return  # the parent is ending and cancelling its children: nothing to wake
    await tx.outbox.append(
        [
            ChildFinished(
                workflow_run_id=parent.id,
                timestamp=now,
                causation_id=causation_id,
                child_run_id=child.id,
                child_workflow_id=child.workflow_id,
                status=child.status.value,
                error=child.error if child.status is not RunStatus.COMPLETED else None,
            )
        ]
    )
    stage = await tx.stages.get(parent.id, WORKFLOW_STAGE_ID)
    if stage is not None and stage.status is StageStatus.SUSPENDED:
        wf = deps.workflow(parent.workflow_id, parent.workflow_version)
        await wake(deps, tx, parent, stage, wf, now)
