"""Continue-as-new: a code workflow run hands its logical workflow to a new run.

A body that calls ``ctx.continue_as_new(input)`` unwinds (``Interrupt("continue")``);
the activation's final transaction (``executor._finish``) then calls ``continue_run``,
which in that one transaction, after the ownership check every activation commit makes:

* ends the run: COMPLETED with no output, its stage COMPLETED, its job done, the search
  attribute ``continued_as`` naming the new run, its idempotency key handed on, and
  ``workflow:continuedAsNew`` (a run-end event: waiters wake, and follow the link);
* creates the new run already RUNNING with its first activation queued (as a child run
  starts), with the new input, an empty journal, the version registered for new runs
  *now* (a chain picks up a deploy at its next link, as Temporal's does), the same
  workflow id, priority, config, parent and idempotency key, and the search attributes
  with ``continued_from`` naming the old run;
* moves the signals and updates the old run had not consumed to the new run's inbox, in
  arrival order (the old copies are marked consumed by ``continued_as:<new id>``), so no
  message is lost between the two runs;
* gives the new run the old run's execution-timeout deadline, if it has one (the
  timeout caps the logical workflow, as Temporal's execution timeout spans its chain);
* re-points a parent's ``child`` wait at the new run, so the parent gets the chain's end.

Both runs are written together or not at all: a crash never leaves neither or both
running. Links live in search attributes (``Run.continued_from`` / ``continued_as``
read them), so no column was added and ``engine.list(attributes=...)`` finds them.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import treadle.kernel.commands as c
from treadle.kernel.events import (
    StageCompleted,
    WorkflowContinuedAsNew,
    WorkflowCreated,
    WorkflowStarted,
)
from treadle.kernel.handlers.basics import insert_started
from treadle.kernel.handlers.common import run_ended
from treadle.kernel.model import (
    CONTINUED_AS,
    CONTINUED_FROM,
    RESERVED_ATTRIBUTES,
    Run,
    RunStatus,
    StageRun,
    StageStatus,
    evolve,
)
from treadle.kernel.workflows.deadline import EXECUTION_TIMEOUT
from treadle.kernel.workflows.model import JournalStatus

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps
    from treadle.kernel.workflows.waits import Interrupt
    from treadle.ports import Transaction

MAX_FOLLOW = 10_000
"""How many links ``current_run`` follows before it gives up (a chain that long means
the caller holds a very old run id; it gets an error rather than a long walk)."""


async def continue_run(
    deps: Deps,
    tx: Transaction,
    run: Run,
    stage: StageRun,
    job_id: str,
    interrupt: Interrupt,
    now: datetime,
    causation_id: str | None,
) -> c.JobExecuteResult:
    """End ``run`` (locked, owned by this activation) and create its continuation, in
    ``tx`` (module docstring). Returns the activation's result: ``completed``, no output."""
    wf = _definition(deps, run.workflow_id, interrupt.version)
    new_id = deps.ids.new_id()
    stage = await tx.stages.update(
        evolve(stage, {"status": StageStatus.COMPLETED, "output": None, "completed_at": now})
    )
    await deps.job_transport.complete(tx, job_id)
    ended = await tx.runs.update(
        evolve(
            run,
            {
                "status": RunStatus.COMPLETED,
                "output": None,
                "completed_at": now,
                "updated_at": now,
                "idempotency_key": None,  # handed on first: (workflow, key) is unique
                "search_attributes": {**run.search_attributes, CONTINUED_AS: new_id},
            },
        )
    )
    kept = {k: v for k, v in run.search_attributes.items() if k not in RESERVED_ATTRIBUTES}
    new = Run(
        id=new_id,
        workflow_id=wf.id,
        workflow_version=wf.version,
        input=interrupt.input,
        config=run.config,
        priority=run.priority,
        idempotency_key=run.idempotency_key,
        parent_run_id=run.parent_run_id,
        search_attributes={**kept, CONTINUED_FROM: run.id},
        trace_context=run.trace_context,
        status=RunStatus.RUNNING,
        current_group=0,
        created_at=now,
        started_at=now,
        updated_at=now,
    )
    await insert_started(deps, tx, new, wf, now)
    await _move_messages(tx, run.id, new.id, now)
    await _carry_deadline(tx, run.id, new.id, now)
    await tx.outbox.append(
        [
            StageCompleted(
                workflow_run_id=run.id,
                timestamp=now,
                causation_id=causation_id,
                stage_id=stage.stage_id,
                attempt=stage.attempt,
                output=None,
                duration=now - stage.started_at if stage.started_at else None,
            ),
            WorkflowContinuedAsNew(
                workflow_run_id=run.id,
                timestamp=now,
                causation_id=causation_id,
                workflow_id=run.workflow_id,
                continued_as=new.id,
                workflow_version=new.workflow_version,
                duration=ended.duration,
            ),
            WorkflowCreated(
                workflow_run_id=new.id,
                timestamp=now,
                causation_id=causation_id,
                workflow_id=new.workflow_id,
                priority=new.priority,
            ),
            WorkflowStarted(
                workflow_run_id=new.id,
                timestamp=now,
                causation_id=causation_id,
                workflow_id=new.workflow_id,
            ),
        ]
    )
    if run.parent_run_id is not None:
        await _repoint_parent(tx, run.parent_run_id, run.id, new.id)
    await run_ended(deps, tx, ended, now, causation_id)  # cancels children it waited for
    return c.JobExecuteResult(
        outcome="completed", workflow_run_id=run.id, stage_id=stage.stage_id, output=None
    )


def _definition(deps: Deps, workflow_id: str, version: str | None) -> WorkflowDefinition:
    """The definition ``continue_as_new`` validated the input against (the version for
    new runs at that moment); the current one for new runs if it has gone since."""
    wf = deps.find_workflow(workflow_id, version)
    return wf if wf is not None and wf.version == version else deps.workflow(workflow_id)


async def _move_messages(tx: Transaction, old_id: str, new_id: str, now: datetime) -> None:
    """Signals and updates the old run never consumed go to the new run, in order."""
    for message in await tx.inbox.for_run(old_id):
        if message.consumed_at is not None or message.id is None:
            continue
        await tx.inbox.insert(evolve(message, {"workflow_run_id": new_id, "id": None}))
        await tx.inbox.consume(message.id, now, f"{CONTINUED_AS}:{new_id}")


async def _carry_deadline(tx: Transaction, old_id: str, new_id: str, now: datetime) -> None:
    """An execution timeout caps the logical workflow, not one run of it: the new run
    gets the old run's deadline (the old run's own timer is discarded when it falls due,
    as for any run that ended first)."""
    for timer in await tx.timers.pending(old_id):
        if timer.purpose == EXECUTION_TIMEOUT:
            await tx.timers.schedule(
                evolve(timer, {"workflow_run_id": new_id, "created_at": now, "id": None})
            )


async def _repoint_parent(tx: Transaction, parent_id: str, old_id: str, new_id: str) -> None:
    """The parent waits for the logical child: its ``child`` entry now names the new run,
    whose end reports to it (the old run's end reports nothing)."""
    await tx.runs.get(parent_id, for_update=True)  # the lock order of a child's report
    for entry in await tx.journal.entries(parent_id, status=JournalStatus.WAITING):
        if entry.kind == "child" and (entry.input or {}).get("child_run_id") == old_id:
            await tx.journal.update(
                evolve(entry, {"input": {**(entry.input or {}), "child_run_id": new_id}})
            )


async def current_run(tx: Transaction, run: Run, *, for_update: bool = False) -> Run:
    """The newest run of ``run``'s chain: ``run`` itself unless it continued as new;
    else the run its ``continued_as`` link leads to, followed to the end (each hop one
    read). Signals and updates sent to an old run id go there."""
    hops = 0
    while run.continued_as is not None and hops < MAX_FOLLOW:
        nxt = await tx.runs.get(run.continued_as, for_update=for_update)
        if nxt is None:
            return run  # the continuation was purged: the old run answers as it is
        run, hops = nxt, hops + 1
    return run
