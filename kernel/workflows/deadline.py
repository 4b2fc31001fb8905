"""Execution timeouts: a cap on a code-workflow run's wall-clock time (DESIGN §3.2).

``@workflow(..., execution_timeout=timedelta(...))`` arms a durable timer when the run
starts (``run.claimPending``), due at ``started_at + execution_timeout``. The
maintenance tick's ``stage.pollSuspended`` fires due ones whatever state the run is in
(running a step, suspended, backing off): each cancels its run through ``run.cancel``
with the reason ``execution timeout``, so the cancel is the one authoritative path —
the run is CANCELLED at once, its registered compensations run (``saga``), and an
activation running at the deadline sees ``ctx.cancelled`` and its result is discarded.
A run that ends first leaves its timer to be discarded at the deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from treadle.kernel.workflows.model import Timer

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.model import Run
    from treadle.ports import Transaction

EXECUTION_TIMEOUT = "execution_timeout"
"""The ``purpose`` of an execution-timeout timer."""

REQUESTED = "execution_timeout_requested"
"""The ``purpose`` of a per-run ``run.create(execution_timeout=...)`` until the run
starts: never due itself (its ``payload`` holds the seconds); ``arm`` turns it into the
real deadline at ``started_at``."""

TIMER_NAME = "execution-timeout"
"""Its name; occurrence 0, which no journal entry uses (they count from 1)."""

REASON = "execution timeout"
"""The cancel reason a timed-out run records (``run.error``, ``workflow:cancelled``)."""


def execution_timeout_of(wf: WorkflowDefinition) -> timedelta | None:
    value = getattr(wf, "execution_timeout", None)
    return value if isinstance(value, timedelta) else None


def forward_timers(timers: Sequence[Timer]) -> list[Timer]:
    """The timers that wake a suspended body (all but the execution timeout)."""
    return [t for t in timers if t.purpose not in (EXECUTION_TIMEOUT, REQUESTED)]


async def request(tx: Transaction, run: Run, cap: timedelta, now: datetime) -> None:
    """At ``run.create``: remember this run's own execution timeout until it starts."""
    await tx.timers.schedule(
        Timer(
            workflow_run_id=run.id,
            name=TIMER_NAME,
            occurrence=0,
            purpose=REQUESTED,
            fire_at=now + cap,
            payload={"seconds": cap.total_seconds()},
            created_at=now,
        )
    )


async def arm(
    tx: Transaction,
    run: Run,
    wf: WorkflowDefinition,
    now: datetime,
    *,
    pending: Sequence[Timer] | None = None,
) -> None:
    """At run start, in the claiming transaction: schedule the run's deadline, from the
    run's own ``execution_timeout`` if it was created with one, else the workflow's.
    ``pending``: the run's timers, when the caller knows them without a read (a run
    created in this very transaction with no ``execution_timeout``: none)."""
    if wf.kind != "code":
        return
    timeout = execution_timeout_of(wf)
    for timer in await tx.timers.pending(run.id) if pending is None else pending:
        if timer.purpose == REQUESTED and isinstance(timer.payload, dict):
            seconds = timer.payload.get("seconds")
            if isinstance(seconds, int | float):
                timeout = timedelta(seconds=seconds)
    if timeout is None:
        return
    await tx.timers.schedule(
        Timer(
            workflow_run_id=run.id,
            name=TIMER_NAME,
            occurrence=0,
            purpose=EXECUTION_TIMEOUT,
            fire_at=(run.started_at or now) + timeout,
            created_at=now,
        )
    )


async def due(tx: Transaction, now: datetime, limit: int) -> list[Timer]:
    """The execution timeouts due at ``now`` (read in the poller's own transaction)."""
    return await tx.timers.due(now, limit, purpose=EXECUTION_TIMEOUT)
