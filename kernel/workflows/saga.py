"""Sagas: compensations a code workflow registers as it goes, run when it fails or is
cancelled (DESIGN §3.2, ``ctx.saga()``).

A compensation function cannot be stored, so the body registers it again on every
replay: ``saga.add(name, fn, *args)`` is a journaled call (kind ``compensation``), which
makes replay check that registrations happen in the same order, and lets ``run.cancel``
see from the journal alone whether a run has anything to undo.

- **On failure** (the body raises out, e.g. an uncaught ``StepFailedError``), the same
  activation runs the registered compensations newest first, each as a durable step
  (kind ``compensate``, journal name ``compensate:<name>``, with the step retry policy
  or the one given to ``add``), then fails the run. A crash in between resumes exactly:
  the replayed body raises again at the same point (its journal is the same), so the
  compensations get the same positions and the finished ones return from the journal.
- **On cancel**, ``run.cancel`` stays authoritative: the run is CANCELLED at once, so no
  forward step can commit. If compensations are registered and not yet run, the same
  transaction puts the orchestrating stage back to PENDING with a new job; that
  activation replays the body in *compensating* mode (it unwinds at its first call whose
  outcome is not journaled) and runs the compensations the same way. The stage then
  becomes CANCELLED too.

A compensation that fails for good does not stop the others: every one gets its turn,
and the outcome (which ran, which failed and why) is appended to the run's ``error`` and
recorded as a ``saga:compensated`` event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from treadle.kernel.errors import StepFailedError
from treadle.kernel.events import SagaCompensated
from treadle.kernel.model import RunStatus, StageStatus, evolve
from treadle.kernel.workflows.activation import enqueue_activation
from treadle.kernel.workflows.definition import WORKFLOW_STAGE_ID
from treadle.kernel.workflows.model import JournalStatus

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps
    from treadle.kernel.model import Run, StageRun
    from treadle.kernel.workflows.context import WorkflowContext
    from treadle.kernel.workflows.model import JournalEntry
    from treadle.ports import Transaction


@dataclass
class SagaOutcome:
    """What running the compensations did, in the order they ran."""

    trigger: Literal["failed", "cancelled"]
    compensated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """``compensated release, refund; compensation failed: notify (ValueError: x)``."""
        parts = []
        if self.compensated:
            parts.append("compensated " + ", ".join(self.compensated))
        if self.failed:
            failures = "; ".join(f"{name} ({error})" for name, error in self.failed.items())
            parts.append(f"compensation failed: {failures}")
        return "; ".join(parts) or "nothing to compensate"

    def event(self, run_id: str, now: datetime, causation_id: str | None) -> SagaCompensated:
        return SagaCompensated(
            workflow_run_id=run_id,
            timestamp=now,
            causation_id=causation_id,
            trigger=self.trigger,
            compensated=list(self.compensated),
            failed=dict(self.failed),
        )


async def run_compensations(
    ctx: WorkflowContext, trigger: Literal["failed", "cancelled"]
) -> SagaOutcome:
    """Run the compensations the body registered, newest first, each a durable step. A
    compensation that fails for good is recorded and the next one still runs; an
    ``Interrupt`` (a retry backoff, a lost run, a storage failure) propagates, and the
    next activation picks up where this one stopped."""
    ctx.begin_compensation()
    outcome = SagaOutcome(trigger)
    totals = Counter(comp.name for comp in ctx.compensations)
    seen: Counter[str] = Counter()
    labels = []  # a name registered more than once is told apart by its registration order
    for comp in ctx.compensations:
        seen[comp.name] += 1
        labels.append(comp.name if totals[comp.name] == 1 else f"{comp.name}#{seen[comp.name]}")
    for compensation, label in reversed(list(zip(ctx.compensations, labels, strict=True))):
        try:
            await ctx.durable_call(
                "compensate",
                compensation.name,
                compensation.fn,
                compensation.args,
                retry=compensation.retry,
                timeout=compensation.timeout,
            )
        except StepFailedError as exc:
            outcome.failed[label] = exc.error or str(exc)
        else:
            outcome.compensated.append(label)
    return outcome


def has_pending_compensations(journal: Sequence[JournalEntry]) -> bool:
    """Whether some registered compensation has not run (to an outcome) yet."""
    registered: Counter[str] = Counter()
    finished: Counter[str] = Counter()
    for entry in journal:
        name = entry.name.split(":", 1)[-1]
        if entry.kind == "compensation":
            registered[name] += 1
        elif entry.kind == "compensate" and entry.status in (
            JournalStatus.COMPLETED,
            JournalStatus.FAILED,
        ):
            finished[name] += 1
    return any(count > finished[name] for name, count in registered.items())


def is_compensating(run: Run | None, stage: StageRun | None) -> bool:
    """A cancelled code-workflow run whose orchestrating stage is still live: its
    compensations are pending (only ``compensate_on_cancel`` leaves a stage so)."""
    return (
        run is not None
        and stage is not None
        and run.status is RunStatus.CANCELLED
        and stage.stage_id == WORKFLOW_STAGE_ID
        and not stage.status.terminal
    )


async def adopt_registrations(
    deps: Deps, tx: Transaction, run_id: str, pending: Sequence[JournalEntry], now: datetime
) -> bool:
    """A forward activation lost its run to a cancel after registering a compensation but
    before committing the registration (between a step's commit and the next boundary),
    so ``run.cancel`` saw nothing to undo. Commit the registrations now and queue the
    compensating activation after all. A run already compensating (or compensated)
    re-registers by itself when it replays, so this only acts on a CANCELLED stage whose
    journal lacks the registrations."""
    if not any(e.kind == "compensation" for e in pending):
        return False
    run = await tx.runs.get(run_id, for_update=True)
    stage = await tx.stages.get(run_id, WORKFLOW_STAGE_ID)
    if run is None or stage is None or run.status is not RunStatus.CANCELLED:
        return False
    if stage.status is not StageStatus.CANCELLED:
        return False
    taken = {e.position for e in await tx.journal.entries(run_id)}
    for entry in pending:
        if entry.id is None and entry.position not in taken:
            await tx.journal.insert(entry)
    return await compensate_on_cancel(deps, tx, run, now)


async def compensate_on_cancel(deps: Deps, tx: Transaction, run: Run, now: datetime) -> bool:
    """Inside ``run.cancel``'s transaction, after the run's stages and jobs were cancelled:
    if the run is a code workflow with compensations registered and not yet run, put its
    orchestrating stage back to PENDING with a new (compensating) activation job."""
    wf = deps.find_workflow(run.workflow_id, run.workflow_version)
    if wf is None or wf.kind != "code":
        return False
    if not has_pending_compensations(await tx.journal.entries(run.id)):
        return False
    stage = await tx.stages.get(run.id, WORKFLOW_STAGE_ID)
    if stage is None:
        return False
    await tx.stages.update(
        evolve(
            stage,
            {
                "status": StageStatus.PENDING,
                "completed_at": None,
                "next_poll_at": None,
                "job_id": None,
            },
        )
    )
    await enqueue_activation(deps, tx, run, wf, now, now)
    return True
