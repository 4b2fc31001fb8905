"""One maintenance tick: the orchestration work every host runs periodically.

The worker's orchestration loop, the serverless ``run_maintenance_tick``, the
Lambda schedule handler and ``treadle tick`` all call ``maintenance_tick``, so
they do the same steps in the same order:

1. ``schedules``: fire the cron schedules that are due (``schedule.fireDue``);
2. ``claim``: claim PENDING runs (enqueues their first jobs);
3. ``poll_suspended``: check due suspended stages, then transition the resumed runs;
4. ``scheduled``: dispatch commands the Scheduler holds that are now due;
5. ``reap_stale``: release leases of workers that stopped heartbeating;
6. ``flush_outbox``: publish committed events to the EventSink (``max_events`` per
   ``outbox.flush``, again while a flush comes back full, ``FLUSH_ROUNDS`` at most);
7. ``reap_stuck``: repair or fail RUNNING runs with no activity;
8. ``purge``: delete one batch of terminal runs past their retention (``run.purge``),
   when a workflow or the engine sets one (docs/lifecycle.md).

Firing schedules first lets the same tick claim the runs they start; claiming before
the flush lets the same tick's flush publish ``workflow:started``; reaping stuck runs
late gives every earlier step the chance to move a run before it is judged stuck;
purging goes last, as the least urgent. Each step is isolated: a failing step is
recorded in the report and the next one still runs, so a broken event sink cannot
stop claims.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from treadle.adapters.logging import structlog_logger
from treadle.kernel import commands as c
from treadle.kernel.errors import describe_exception
from treadle.kernel.handlers.retention import retains

if TYPE_CHECKING:
    from treadle.kernel.kernel import Kernel
    from treadle.kernel.model import Job

STEP_ORDER = (
    "schedules",
    "claim",
    "poll_suspended",
    "scheduled",
    "reap_stale",
    "flush_outbox",
    "reap_stuck",
    "purge",
)
"""The fixed order of a tick's steps (see the module docstring for why)."""


class TickStep(BaseModel):
    """What one step did: its result fields, or the error that stopped it."""

    model_config = ConfigDict(frozen=True)

    result: dict[str, Any] | None = None
    error: str | None = None
    duration: float = 0.0
    """Wall-clock seconds the step took."""

    @property
    def ok(self) -> bool:
        return self.error is None


class TickReport(BaseModel):
    """Per-step outcomes of one tick, in execution order; ``ok`` when no step failed.

    Hosts turn it into an exit code (``treadle tick``), a Lambda response or a log line.
    """

    model_config = ConfigDict(frozen=True)

    worker_id: str
    started_at: datetime
    steps: dict[str, TickStep] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps.values())

    @property
    def errors(self) -> dict[str, str]:
        return {name: step.error for name, step in self.steps.items() if step.error is not None}

    @property
    def all_failed(self) -> bool:
        """Every step that reached storage failed: the backend is most likely unreachable,
        and a worker should back off. A ``scheduled`` step with nothing due does not count:
        the in-memory scheduler answers even when the database is down; nor does a
        ``purge`` skipped because nothing can expire (it asked storage nothing)."""
        relevant = [
            step
            for name, step in self.steps.items()
            if not (name == "scheduled" and step.ok and not (step.result or {}).get("due"))
            and not (step.ok and (step.result or {}).get("skipped"))
        ]
        return bool(relevant) and not any(step.ok for step in relevant)

    def result(self, step: str) -> dict[str, Any]:
        """A step's result fields, empty if it failed or did not run."""
        found = self.steps.get(step)
        return dict(found.result or {}) if found is not None else {}

    @property
    def claimed_runs(self) -> int:
        return len(self.result("claim").get("claimed", ()))

    @property
    def new_work(self) -> bool:
        """The tick made jobs available (claimed, resumed, released, re-enqueued runs), so
        a job loop should look for work now rather than at its next poll."""
        return bool(
            self.claimed_runs
            or self.result("poll_suspended").get("resumed")
            or self.result("poll_suspended").get("timed_out_workflow_run_ids")
            or self.result("reap_stale").get("released")
            or self.result("reap_stuck").get("transitioned")
            or self.result("scheduled").get("dispatched")
            or self.result("schedules").get("fired")
        )


StepFn = Callable[[], Awaitable[dict[str, Any]]]


ErrorHook = Callable[[Exception, str], None]
"""Told each exception a tick logs and reports instead of raising, with its step's name
(``on_error``)."""


async def _run_step(name: str, fn: StepFn, log: Any, on_error: ErrorHook | None) -> TickStep:
    started = time.monotonic()
    try:
        result = await fn()
    except _PartialStepError as exc:
        log.error("tick.step_failed", step=name, error=exc.message)
        return TickStep(result=exc.result, error=exc.message, duration=time.monotonic() - started)
    except Exception as exc:
        error = describe_exception(exc)
        log.error("tick.step_failed", step=name, error=error)
        if on_error is not None:
            on_error(exc, name)
        return TickStep(error=error, duration=time.monotonic() - started)
    return TickStep(result=result, duration=time.monotonic() - started)


async def claim_step(
    kernel: Kernel,
    *,
    worker_id: str,
    max_claims: int = 10,
    chain: int = 0,
    take: Callable[[list[Job]], None] | None = None,
) -> dict[str, Any]:
    """``run.claimPending`` alone: what a worker runs when woken by a fresh start.

    ``chain``: lease up to that many claimed runs' first stages to ``worker_id``, started
    in the claim's commit (``RunClaimPending.chain``); ``take`` receives those jobs and
    must execute or release each. Without ``take`` nothing is chained."""
    result = await kernel.dispatch(
        c.RunClaimPending(
            worker_id=worker_id, max_claims=max_claims, chain=chain if take is not None else 0
        )
    )
    if take is not None and result.chained_jobs:
        take(result.chained_jobs)
        # Let the chained stages start before this step's bookkeeping: a chained job's
        # body runs without another round trip, so it is the next thing to do.
        await asyncio.sleep(0)
    return result.model_dump(mode="json")


async def _no_claim() -> dict[str, Any]:
    """The claim step of a tick told not to claim (``maintenance_tick(claim=False)``)."""
    return {"claimed": [], "chained_jobs": [], "skipped": True}


async def _poll_step(
    kernel: Kernel,
    max_checks: int,
    log: Any,
    on_resumed: Callable[[], None] | None = None,
    on_error: ErrorHook | None = None,
    *,
    worker_id: str | None = None,
    chain: int = 0,
    take: Callable[[list[Job]], None] | None = None,
) -> dict[str, Any]:
    """Poll due suspended stages, then transition each resumed run. One transition failing
    does not stop the others; the step reports the failures as its error. ``on_resumed``
    is called as soon as the poll resumed a run, before the transitions: the resuming
    commit already queued its next job (a code workflow's activation, a batch stage's
    next group), and a job loop can take it while the transitions, a safety net, run.

    ``chain`` and ``take`` (with ``worker_id``): the activations of up to ``chain`` code
    workflows whose timers fire are leased to ``worker_id`` and started in the firing
    commit (``StagePollSuspended.chain``); ``take`` receives those jobs and must execute
    or release each. Their runs need neither a dequeue (``on_resumed`` is called only
    for runs whose next job was queued) nor the safety-net transition (their stage is
    RUNNING, started in that commit)."""
    polled = await kernel.dispatch(
        c.StagePollSuspended(
            max_checks=max_checks,
            worker_id=worker_id,
            chain=chain if take is not None and worker_id is not None else 0,
        )
    )
    chained = {job.workflow_run_id for job in polled.chained_jobs}
    if take is not None and polled.chained_jobs:
        take(polled.chained_jobs)
    queued = [r for r in polled.resumed_workflow_run_ids if r not in chained]
    if on_resumed is not None and queued:
        on_resumed()
    if chained:
        await asyncio.sleep(0)  # let the chained activations start before the bookkeeping
    result = polled.model_dump(mode="json")
    failures: list[str] = []
    transitioned = 0
    for run_id in queued:
        try:
            await kernel.dispatch(c.RunTransition(workflow_run_id=run_id))
            transitioned += 1
        except Exception as exc:
            log.error("tick.transition_failed", run_id=run_id, error=describe_exception(exc))
            if on_error is not None:
                on_error(exc, "poll_suspended")
            failures.append(f"{run_id}: {describe_exception(exc)}")
    result["transitioned"] = transitioned
    if failures:
        raise _PartialStepError(
            f"run.transition failed for {len(failures)} run(s): {failures}", result
        )
    return result


class _PartialStepError(Exception):
    """A step that did part of its work: ``result`` is what it did, ``message`` what
    failed. The report keeps both, so e.g. resumed runs still wake a job loop."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.message = message
        self.result = result


async def _scheduled_step(
    kernel: Kernel, limit: int, log: Any, on_error: ErrorHook | None = None
) -> dict[str, Any]:
    """Dispatch due scheduled commands (timers). A command that fails is logged; the
    Scheduler has already handed it over, so it is reported rather than retried here."""
    due = await kernel.deps.scheduler.due(kernel.deps.clock.now(), limit=limit)
    dispatched = 0
    failures: list[str] = []
    for command in due:
        try:
            await kernel.dispatch(command)
            dispatched += 1
        except Exception as exc:
            kind = command.get("type")
            log.error("tick.scheduled_failed", command=kind, error=describe_exception(exc))
            if on_error is not None:
                on_error(exc, "scheduled")
            failures.append(f"{kind}: {describe_exception(exc)}")
    if failures:
        raise _PartialStepError(
            f"{len(failures)} of {len(due)} scheduled command(s) failed: {failures}",
            {"due": len(due), "dispatched": dispatched},
        )
    return {"due": len(due), "dispatched": dispatched}


async def schedules_step(kernel: Kernel, max_schedules: int = 50) -> dict[str, Any]:
    """``schedule.fireDue``: start the runs of the cron schedules that are due."""
    result = await kernel.dispatch(c.ScheduleFireDue(max_schedules=max_schedules))
    return result.model_dump(mode="json")


async def due_steps(
    kernel: Kernel,
    *,
    worker_id: str,
    max_checks: int = 50,
    max_scheduled: int = 100,
    logger: Any = None,
    poll: bool = True,
    scheduled: bool = True,
    schedules: bool = False,
    on_resumed: Callable[[], None] | None = None,
    chain: int = 0,
    take: Callable[[list[Job]], None] | None = None,
) -> dict[str, TickStep]:
    """The tick's time-driven steps alone (``schedules``, ``poll_suspended``,
    ``scheduled``), for a worker woken because timed work fell due between two full
    ticks; ``schedules``, ``poll`` and ``scheduled`` say which fell due (a step with
    nothing due is one query for nothing). ``on_resumed``, ``chain`` and ``take``: as
    for the poll step (see ``_poll_step``)."""
    log = (logger or structlog_logger("treadle.runtime")).bind(worker_id=worker_id)
    steps: dict[str, TickStep] = {}
    if schedules:
        steps["schedules"] = await _run_step("schedules", lambda: schedules_step(kernel), log, None)
    if poll:
        steps["poll_suspended"] = await _run_step(
            "poll_suspended",
            lambda: _poll_step(
                kernel, max_checks, log, on_resumed, worker_id=worker_id, chain=chain, take=take
            ),
            log,
            None,
        )
    if scheduled:
        steps["scheduled"] = await _run_step(
            "scheduled", lambda: _scheduled_step(kernel, max_scheduled, log), log, None
        )
    return steps


FLUSH_ROUNDS = 10
"""The most ``outbox.flush`` commands one tick's flush step sends (each of
``max_events``): it stops early at the first batch that is not full."""


async def maintenance_tick(
    kernel: Kernel,
    *,
    worker_id: str,
    stale_threshold: timedelta | float = timedelta(seconds=60),
    stuck_threshold: timedelta | float = timedelta(minutes=30),
    max_claims: int = 10,
    max_checks: int = 50,
    max_events: int = 100,
    max_scheduled: int = 100,
    max_purged: int = 100,
    logger: Any = None,
    chain: int = 0,
    take: Callable[[list[Job]], None] | None = None,
    on_error: ErrorHook | None = None,
    claim: bool = True,
) -> TickReport:
    """Run the steps of one tick in ``STEP_ORDER`` and report what each did.

    Never raises for a failing step (see ``TickReport.ok``); a number for a threshold
    means seconds, as in the kernel's commands. ``chain`` and ``take``: as for
    ``claim_step``, for the claim step, then for the poll step's woken code workflows
    (``_poll_step``) up to the slots the claim left. ``on_error`` is told each exception a step
    swallowed (a harness re-raises programming errors: ``TestEngine``). ``claim=False``
    leaves the claim step out (reported as claiming nothing, ``skipped``): a saturated
    worker that claims for its slots as they free (``Worker.tick``).
    """
    log = (logger or structlog_logger("treadle.runtime")).bind(worker_id=worker_id)
    stale = (
        stale_threshold
        if isinstance(stale_threshold, timedelta)
        else timedelta(seconds=stale_threshold)
    )
    stuck = (
        stuck_threshold
        if isinstance(stuck_threshold, timedelta)
        else timedelta(seconds=stuck_threshold)
    )

    async def reap_stale() -> dict[str, Any]:
        result = await kernel.dispatch(c.LeaseReapStale(stale_threshold=stale))
        telemetry = kernel.deps.telemetry
        if telemetry is not None:
            telemetry.leases_expired(result.released)
        return result.model_dump(mode="json")

    async def flush() -> dict[str, Any]:
        # A full batch published means more events are probably waiting: flush again,
        # so a tick every 10 s keeps up with more than max_events events per tick.
        total = {"published": 0, "failed": 0, "dead_lettered": 0}
        for _ in range(FLUSH_ROUNDS):
            result = await kernel.dispatch(c.OutboxFlush(max_events=max_events))
            total["published"] += result.published
            total["failed"] += result.failed
            total["dead_lettered"] += result.dead_lettered
            if result.published < max_events:
                break
        return total

    async def reap_stuck() -> dict[str, Any]:
        result = await kernel.dispatch(c.RunReapStuck(stuck_threshold=stuck))
        return result.model_dump(mode="json")

    async def purge() -> dict[str, Any]:
        if not retains(kernel.deps):
            return {"purged": 0, "skipped": True}  # nothing ever expires: no query
        result = await kernel.dispatch(c.RunPurge(max_runs=max_purged))
        return {"purged": result.purged, "blobs_deleted": result.blobs_deleted}

    handed: list[Job] = []

    def taking(jobs: list[Job]) -> None:
        """``take``, counting the slots the claim's and the poll's chained jobs filled."""
        handed.extend(jobs)
        assert take is not None
        take(jobs)

    steps: dict[str, StepFn] = {
        "schedules": lambda: schedules_step(kernel),
        "claim": (
            (
                lambda: claim_step(
                    kernel,
                    worker_id=worker_id,
                    max_claims=max_claims,
                    chain=chain,
                    take=taking if take is not None else None,
                )
            )
            if claim
            else _no_claim
        ),
        # Woken code workflows' activations chained to the slots the claim left.
        "poll_suspended": lambda: _poll_step(
            kernel,
            max_checks,
            log,
            on_error=on_error,
            worker_id=worker_id,
            chain=max(0, chain - len(handed)),
            take=taking if take is not None and chain > len(handed) else None,
        ),
        "scheduled": lambda: _scheduled_step(kernel, max_scheduled, log, on_error),
        "reap_stale": reap_stale,
        "flush_outbox": flush,
        "reap_stuck": reap_stuck,
        "purge": purge,
    }
    started_at = kernel.deps.clock.now()
    outcomes = {name: await _run_step(name, steps[name], log, on_error) for name in STEP_ORDER}
    report = TickReport(worker_id=worker_id, started_at=started_at, steps=outcomes)
    if report.ok:
        log.debug("tick.done", claimed=report.claimed_runs)
    else:
        log.warning("tick.done_with_errors", errors=report.errors)
    return report
