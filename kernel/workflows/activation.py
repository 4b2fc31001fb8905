"""Storage helpers of code workflows shared by the executor, the message and timer
handlers, child runs and compensations: writing journal entries, merging search
attributes and queueing (or waking) the next activation of a body.

A floor below ``executor``, so that ``children``, ``saga`` and ``handlers/workflows``
import these without importing the activation that imports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from treadle.kernel.handlers.basics import new_jobs
from treadle.kernel.model import Run, RunStatus, StageRun, StageStatus, evolve
from treadle.kernel.workflows.definition import WORKFLOW_STAGE_ID
from treadle.kernel.workflows.model import JournalEntry, JournalStatus

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps
    from treadle.ports import Transaction


async def write_entries(
    tx: Transaction, entries: Sequence[JournalEntry], now: datetime
) -> list[JournalEntry]:
    """Insert new entries, update stored ones; an entry that stopped waiting disarms its
    timer, so a timer never wakes a run for a wait that is over."""
    stored: list[JournalEntry] = []
    for entry in entries:
        if entry.id is None:
            stored.append(await tx.journal.insert(entry))
            continue
        stored.append(await tx.journal.update(entry))
        if entry.status in (JournalStatus.COMPLETED, JournalStatus.FAILED, JournalStatus.CANCELLED):
            await tx.timers.fire(entry.workflow_run_id, entry.name, entry.occurrence, now)
    return stored


async def apply_attributes(
    tx: Transaction, run: Run, entries: Sequence[JournalEntry], now: datetime
) -> Run:
    """Merge the search attributes that new ``set_attribute`` entries record into the run,
    in the transaction that journals them; returns the run as stored."""
    attributes = {
        entry.name.split(":", 1)[1]: entry.result
        for entry in sorted(entries, key=lambda e: e.position)
        if entry.kind == "attribute" and entry.id is None
    }
    if not attributes:
        return run
    merged = {**run.search_attributes, **attributes}
    return await tx.runs.update(evolve(run, {"search_attributes": merged, "updated_at": now}))


async def enqueue_activation(
    deps: Deps, tx: Transaction, run: Run, wf: WorkflowDefinition, at: datetime, now: datetime
) -> str:
    """A new job for the next activation of the body, available from ``at``."""
    job = evolve(new_jobs(deps, run, wf, [WORKFLOW_STAGE_ID], now)[0], {"next_poll_at": at})
    await deps.job_transport.enqueue(tx, [job])
    return job.id


async def wake(
    deps: Deps, tx: Transaction, run: Run, stage: StageRun, wf: WorkflowDefinition, now: datetime
) -> None:
    """Resume a suspended body: the stage is PENDING with a new job, the run RUNNING."""
    await tx.stages.update(
        evolve(
            stage,
            {"status": StageStatus.PENDING, "next_poll_at": None, "job_id": None, "error": None},
        )
    )
    await enqueue_activation(deps, tx, run, wf, now, now)
    if run.status is RunStatus.SUSPENDED:
        # ``error`` of a live run is a version mismatch it was blocked by (versions.py).
        await tx.runs.update(
            evolve(run, {"status": RunStatus.RUNNING, "error": None, "updated_at": now})
        )
