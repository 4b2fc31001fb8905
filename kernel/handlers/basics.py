"""The floor of the handlers: loading a run, building and queueing its stages' jobs.

Below ``handlers/common`` (the transition table, a run's end) so that the code-workflow
helpers a run's end calls (``workflows/children``, ``workflows/activation``), ``fork``
and ``annotations`` use these without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from treadle.kernel.errors import RunNotFoundError
from treadle.kernel.model import Job, JobStatus, Run, StageRun, construct

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps
    from treadle.ports import Transaction

# Bound once: an attribute lookup through the enum metaclass costs on every stage.
_JOB_LEASED = JobStatus.LEASED


async def load_run(tx: Transaction, run_id: str, *, for_update: bool = True) -> Run:
    run = await tx.runs.get(run_id, for_update=for_update)
    if run is None:
        raise RunNotFoundError(f"no run with id {run_id!r}")
    return run


def new_jobs(
    deps: Deps,
    run: Run,
    wf: WorkflowDefinition,
    stage_ids: Sequence[str],
    now: datetime,
    *,
    lease_to: str | None = None,
) -> list[Job]:
    """One QUEUED job per stage, on the stage's queue; with ``lease_to``, the first is
    created already leased to that worker (its first attempt counted), as ``dequeue``
    would have leased it, when that worker serves its queue (never a remote stage).
    Built with ``construct``: every value is the kernel's own (a new id, the run's fields,
    the clock's reading), and a job per stage is on every stage's path."""
    jobs: list[Job] = []
    for stage_id in stage_ids:
        queue = wf.queue_of(stage_id)
        values: dict[str, object] = {
            "id": deps.ids.new_id(),
            "workflow_run_id": run.id,
            "workflow_id": run.workflow_id,
            "stage_id": stage_id,
            "priority": run.priority,
            "max_attempts": wf.stages[stage_id].retry.max_attempts,
            "next_poll_at": now,
            "enqueued_at": now,
            "queue": queue,
        }
        if (
            lease_to is not None
            and not jobs
            and deps.chains.serves(lease_to, queue)
            and not wf.stages[stage_id].remote  # only a remote worker's lease runs it
        ):
            values["status"] = _JOB_LEASED
            values["attempts"] = 1
            values["worker_id"] = lease_to
            values["heartbeat_at"] = now
        jobs.append(construct(Job, values))
    return jobs


async def enqueue_stages(
    deps: Deps,
    tx: Transaction,
    run: Run,
    wf: WorkflowDefinition,
    stages: Sequence[StageRun],
    now: datetime,
    *,
    lease_to: str | None = None,
) -> list[Job]:
    """Create one job per stage in the same transaction as the caller's state change.
    (The stage learns its job id when the job starts executing.) Returns the jobs."""
    jobs = new_jobs(deps, run, wf, [s.stage_id for s in stages], now, lease_to=lease_to)
    await deps.job_transport.enqueue(tx, jobs)
    return jobs


async def insert_started(
    deps: Deps, tx: Transaction, run: Run, wf: WorkflowDefinition, now: datetime
) -> None:
    """Insert ``run`` (already RUNNING at group 0) with its stages, PENDING in group then
    definition order, and queue group 0's jobs: a run started in the transaction that
    creates it (a child, a continue-as-new successor)."""
    stages = [
        StageRun(workflow_run_id=run.id, stage_id=stage.id, execution_group=index)
        for index, group in enumerate(wf.groups)
        for stage in group
    ]
    await tx.runs.insert(run)
    await tx.stages.insert_many(stages)
    if wf.max_cost is not None:  # the workflow's AI budget, as run.create sets it
        await tx.ai_calls.set_budget(run.id, wf.max_cost)
    await enqueue_stages(deps, tx, run, wf, [s for s in stages if s.execution_group == 0], now)
