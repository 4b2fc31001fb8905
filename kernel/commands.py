"""Commands (imperative requests to the kernel) and their typed results.

Every command is a frozen pydantic model with a ``Literal`` ``type``. ``COMMANDS``
(at the end) is the registry that pairs each with its result; the union ``Command``,
which lets ``Kernel.dispatch`` accept a plain mapping and validate it, derives from it.
Duration fields are ``timedelta``; a bare number means seconds.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from treadle.kernel.limits import Duration, Text, TraceParent
from treadle.kernel.model import Job, JsonValue, RunStatus
from treadle.kernel.schedules import (
    MAX_CATCHUP_LIMIT,
    CatchupPolicy,
    OverlapPolicy,
    Schedule,
    ScheduleSpec,
)


class CommandBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    idempotency_key: Text | None = Field(default=None, min_length=1, max_length=255)


class ResultBase(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- run.create -------------------------------------------------------------
class SignalSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: Text = Field(min_length=1)
    payload: JsonValue = None


class RunCreate(CommandBase):
    type: Literal["run.create"] = "run.create"
    workflow_id: Text = Field(min_length=1)
    input: JsonValue = None
    config: dict[str, JsonValue] = Field(default_factory=dict)
    priority: int = Field(default=5, ge=0, le=100)
    run_id: Text | None = Field(default=None, min_length=1, max_length=128)
    search_attributes: dict[str, JsonValue] = Field(default_factory=dict)
    signal: SignalSpec | None = None
    parent_run_id: Text | None = None
    concurrency_key: Text | None = Field(default=None, min_length=1, max_length=255)
    """Runs sharing a key share the workflow's ``concurrency_per_key`` slots and, with
    ``RateLimit(per_key=True)``, its rate (``kernel/flow_control.py``)."""
    execution_timeout: Duration | None = Field(default=None, gt=timedelta(0))
    """Code workflows: this run's cap on wall-clock time from its start, overriding the
    workflow's ``execution_timeout``."""
    max_cost: Decimal | None = Field(default=None, ge=0, allow_inf_nan=False)
    """This run's AI budget, overriding the workflow's ``max_cost`` (``kernel/ai.py``)."""
    trace_context: TraceParent | None = None
    """The caller's W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``), stored with
    the run so its stage spans join the caller's trace (docs/observability.md)."""
    claim_for: str | None = Field(default=None, min_length=1)
    """A worker (in the caller's process) with a free slot: the new run is claimed for it
    in the same transaction, its first stage leased to it and started, and returned as
    ``chained_job`` for that worker to execute (a start then a claim in one commit)."""


class RunCreateResult(ResultBase):
    workflow_run_id: str
    status: RunStatus
    created: bool = True
    chained_job: Job | None = None
    """With ``claim_for``: the first stage's job, leased to that worker and started;
    execute it with ``job.execute`` (or release it). Never replayed from the cache."""


# -- run.createMany ---------------------------------------------------------
MAX_CREATE_MANY = 10_000
"""The most items one ``run.createMany`` takes (one transaction; ``Engine.start_many``
sends batches of 1,000)."""


class RunCreateItem(BaseModel):
    """One run of a ``run.createMany``: the fields of ``run.create`` that a bulk start
    needs (no signal-with-start, no per-run execution timeout or parent)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    workflow_id: Text = Field(min_length=1)
    input: JsonValue = None
    config: dict[str, JsonValue] = Field(default_factory=dict)
    priority: int = Field(default=5, ge=0, le=100)
    idempotency_key: Text | None = Field(default=None, min_length=1, max_length=255)
    """The run's key, unique per workflow: an item whose key names an existing run (or
    an earlier item of the batch) returns that run with ``created=False``."""
    run_id: Text | None = Field(default=None, min_length=1, max_length=128)
    search_attributes: dict[str, JsonValue] = Field(default_factory=dict)
    concurrency_key: Text | None = Field(default=None, min_length=1, max_length=255)
    trace_context: TraceParent | None = None


class RunCreateMany(CommandBase):
    type: Literal["run.createMany"] = "run.createMany"
    items: list[RunCreateItem] = Field(max_length=MAX_CREATE_MANY)


class RunCreateManyResult(ResultBase):
    runs: list[RunCreateResult]
    """One per item, in the items' order."""


# -- run.claimPending -------------------------------------------------------
class RunClaimPending(CommandBase):
    type: Literal["run.claimPending"] = "run.claimPending"
    worker_id: str = Field(min_length=1)
    max_claims: int = Field(default=10, ge=1, le=1000)
    chain: int = Field(default=0, ge=0, le=1000)
    """Lease the first group-0 job of up to this many claimed runs to ``worker_id`` and
    commit those stages' start in the claim's transaction; the result returns them as
    ``chained_jobs``, which the caller must execute with ``job.execute`` (or release).
    ``0`` (the default): every group-0 job is queued for any worker."""


class ClaimedRun(ResultBase):
    workflow_run_id: str
    workflow_id: str
    job_ids: list[str]


class RunClaimPendingResult(ResultBase):
    claimed: list[ClaimedRun]
    chained_jobs: list[Job] = Field(default_factory=list)
    """With ``chain``: the jobs leased to ``worker_id`` whose stages already started
    (stage RUNNING, ``stage:started`` committed); execute each with ``job.execute``."""
    deferred: int = 0
    """PENDING runs passed over because a concurrency or rate limit was full: they wait
    for a run of theirs to end (or ``retry_at``), in their place in the order."""
    retry_at: datetime | None = None
    """The earliest time a rate limit frees a start for a passed-over run (``None``:
    only a run's end frees a slot)."""


# -- run.transition ---------------------------------------------------------
class RunTransition(CommandBase):
    type: Literal["run.transition"] = "run.transition"
    workflow_run_id: Text = Field(min_length=1)


class RunTransitionResult(ResultBase):
    action: Literal["advanced", "completed", "failed", "noop"]
    next_group: int | None = None


# -- run.cancel -------------------------------------------------------------
class RunCancel(CommandBase):
    type: Literal["run.cancel"] = "run.cancel"
    workflow_run_id: Text = Field(min_length=1)
    reason: Text | None = None


class RunCancelResult(ResultBase):
    cancelled: bool


# -- run.pause / run.resume / run.terminate (docs/lifecycle.md) -------------
class RunPause(CommandBase):
    """Start no new stage or step of the run; the one in flight finishes and commits."""

    type: Literal["run.pause"] = "run.pause"
    workflow_run_id: Text = Field(min_length=1)
    reason: Text | None = None


class RunPauseResult(ResultBase):
    paused: bool
    """False when the run was paused already (nothing changed)."""


class RunResume(CommandBase):
    """Go on with a paused run from where it stopped."""

    type: Literal["run.resume"] = "run.resume"
    workflow_run_id: Text = Field(min_length=1)
    reason: Text | None = None


class RunResumeResult(ResultBase):
    resumed: bool
    """False when the run was not paused (nothing changed)."""
    requeued_jobs: int = 0
    """Jobs held while paused that are queued again."""


class RunTerminate(CommandBase):
    """End the run at once (CANCELLED), without running its compensations."""

    type: Literal["run.terminate"] = "run.terminate"
    workflow_run_id: Text = Field(min_length=1)
    reason: Text | None = None


class RunTerminateResult(ResultBase):
    terminated: bool
    """False when the run had already ended (nothing changed)."""


# -- run.purge (retention) ----------------------------------------------------
MAX_PURGE_BATCH = 1000
"""The most runs one ``run.purge`` deletes (one transaction; the tick takes 100)."""


class RunPurge(CommandBase):
    """Delete terminal runs that ended before a cutoff, with everything stored for them.

    ``older_than`` given: runs that ended more than that long ago. ``None``: each run's
    workflow ``retention`` (or the engine's default), the maintenance tick's form; runs
    whose workflow keeps them forever are never selected. Non-terminal runs are never
    purged, whatever the arguments."""

    type: Literal["run.purge"] = "run.purge"
    older_than: Duration | None = Field(default=None, ge=timedelta(0))
    statuses: list[RunStatus] | None = None
    """Only runs in these (terminal) statuses; ``None``: every terminal status."""
    workflow_id: Text | None = None
    max_runs: int = Field(default=100, ge=1, le=MAX_PURGE_BATCH)
    dry_run: bool = False
    """Select and count, delete nothing."""

    @field_validator("statuses")
    @classmethod
    def _terminal_only(cls, value: list[RunStatus] | None) -> list[RunStatus] | None:
        live = sorted(s.value for s in value or () if not s.terminal)
        if live:
            raise ValueError(
                f"only terminal runs can be purged (COMPLETED, FAILED, CANCELLED), not {live}"
            )
        return value


class RunPurgeResult(ResultBase):
    purged: int
    """Runs deleted (with ``dry_run``: runs that would be)."""
    workflow_run_ids: list[str]
    blobs_deleted: int = 0
    more: bool = False
    """The batch was full: more expired runs may be waiting."""
    dry_run: bool = False


# -- run.rerunFrom ----------------------------------------------------------
class RunRerunFrom(CommandBase):
    type: Literal["run.rerunFrom"] = "run.rerunFrom"
    workflow_run_id: Text = Field(min_length=1)
    from_stage_id: Text = Field(min_length=1)
    config: dict[str, JsonValue] | None = None
    """New config of stages the rerun resets, ``{stage_id: {...}}``, validated as
    ``run.create``'s; stages it does not name keep theirs. ``None``: no change."""


class RunRerunFromResult(ResultBase):
    workflow_run_id: str
    from_stage_id: str
    deleted_stages: list[str]


# -- job.execute ------------------------------------------------------------
class JobExecute(CommandBase):
    type: Literal["job.execute"] = "job.execute"
    job_id: str = Field(min_length=1)
    worker_id: str = Field(min_length=1)
    chain: bool = False
    """When the result's commit enqueues the run's next group, lease its first job to
    ``worker_id`` and commit that stage's start in the same transaction; the result
    returns it as ``chained_job``, which the caller must execute (or release) next."""


class JobExecuteResult(ResultBase):
    outcome: Literal["completed", "suspended", "failed"]
    workflow_run_id: str | None = None
    stage_id: str | None = None
    output: JsonValue = None
    error: str | None = None
    next_poll_at: datetime | None = None
    ghost: bool = False
    retryable: bool = False
    chained_job: Job | None = None
    """With ``chain=True``: the next stage's job, leased to this worker and already
    started (stage RUNNING, ``stage:started`` committed); execute it with ``job.execute``."""
    queued_jobs: int = 0
    """Jobs this commit queued for any worker to take now (a parallel group's stages
    beyond the chained one): a host with free slots should dequeue at once."""


# -- remote execution: job.begin, job.complete, job.fail, job.suspend, job.heartbeat --
class JobBegin(CommandBase):
    """Phase 1 of ``job.execute`` for an executor outside the kernel's process (a remote
    worker, ``docs/remote-workers.md``): the job, already leased to ``worker_id`` by
    ``JobTransport.dequeue``, has its stage started (RUNNING, attempt counted,
    ``stage:started``) exactly as ``job.execute`` starts it; the result carries what the
    body needs. The outcome is committed later by ``job.complete``, ``job.fail`` or
    ``job.suspend`` through ``job.execute``'s own phase 3. Only remote stages."""

    type: Literal["job.begin"] = "job.begin"
    job_id: str = Field(min_length=1)
    worker_id: str = Field(min_length=1)


class JobBeginResult(ResultBase):
    started: bool
    """False when the stage was not started (``reason`` says why: the run was cancelled
    or paused meanwhile, the lease is not this worker's); nothing is left to do."""
    job_id: str
    workflow_run_id: str | None = None
    workflow_id: str | None = None
    stage_id: str | None = None
    attempt: int = 0
    """The lease's ``Job.attempts``: name it in ``job.complete`` / ``fail`` / ``suspend``."""
    stage_attempt: int = 0
    """The stage's attempt number, as ``ctx.attempt`` gives it to a local body."""
    idempotency_key: str | None = None
    """``ctx.idempotency_key``: stable across retries of this stage in this run."""
    input: JsonValue = None
    """The stage's input, validated against its input model (``None`` for ``input="none"``)."""
    config: JsonValue = None
    """The stage's config with defaults applied, or ``None``."""
    resume_state: JsonValue = None
    """What the last ``job.suspend`` of this stage saved, when it is resumed."""
    trace_context: str | None = None
    """The run's W3C ``traceparent`` (``Run.trace_context``), when its start stored one:
    the remote body's spans join the run's trace as children of it."""
    reason: str | None = None


class _RemoteOutcome(CommandBase):
    job_id: str = Field(min_length=1)
    worker_id: str = Field(min_length=1)
    attempt: int = Field(ge=1)
    """The lease's ``Job.attempts`` from ``job.begin``: an outcome meant for an earlier
    lease (reaped and leased again) is a ghost."""


class JobComplete(_RemoteOutcome):
    """Commit a remote execution's output, validated against the stage's output model
    (a wrong shape fails the stage without retry, as in-process)."""

    type: Literal["job.complete"] = "job.complete"
    output: JsonValue = None


class JobFail(_RemoteOutcome):
    """Commit a remote execution's failure under the stage's retry policy."""

    type: Literal["job.fail"] = "job.fail"
    error: str = Field(min_length=1, max_length=10_000)
    error_type: str | None = Field(default=None, max_length=200)
    """The remote error's class name, shown before the message."""
    retryable: bool = True
    """False: fail the stage for good, as ``NonRetryableError`` does."""


class JobSuspend(_RemoteOutcome):
    """Park the stage as a batch stage's ``Suspend`` does: at ``poll_interval`` its job is
    leased again with ``resume_state`` = ``state``; past ``max_wait`` the stage fails."""

    type: Literal["job.suspend"] = "job.suspend"
    state: JsonValue = None
    poll_interval: Duration = Field(gt=timedelta(0))
    max_wait: Duration = Field(default=timedelta(hours=24), gt=timedelta(0))


class JobCompleteResult(JobExecuteResult):
    """``job.execute``'s result, for ``job.complete``: ``ghost=True`` when the output was
    discarded (run cancelled, lease reaped and taken by another attempt)."""


class JobFailResult(JobExecuteResult):
    """``job.execute``'s result, for ``job.fail``: ``retryable`` and ``next_poll_at`` say
    whether and when the stage is tried again."""


class JobSuspendResult(JobExecuteResult):
    """``job.execute``'s result, for ``job.suspend``: ``next_poll_at`` is when the stage is
    leased again."""


class JobHeartbeat(_RemoteOutcome):
    """Extend the lease of a job this worker holds at ``attempt``."""

    type: Literal["job.heartbeat"] = "job.heartbeat"


class JobHeartbeatResult(ResultBase):
    held: bool
    """False: the lease is no longer this worker's (run cancelled, lease reaped): stop."""
    cancelled: bool = False
    """The run was cancelled (or ended): the body should stop; its result would be a ghost."""


# -- job.release ------------------------------------------------------------
class JobRelease(CommandBase):
    """Hand back a leased job without a verdict from its stage (see ``handlers/leases.py``).

    ``reason``: ``interrupted`` when the host stops on purpose (the attempt is refunded
    and the job is available at once); ``errored`` when ``job.execute`` raised (the
    attempt counts: retry backoff, or the stage fails once ``max_attempts`` is used)."""

    type: Literal["job.release"] = "job.release"
    job_id: str = Field(min_length=1)
    worker_id: str = Field(min_length=1)
    attempt: int = Field(ge=1)
    """The lease's ``Job.attempts``: a release meant for an earlier lease changes nothing."""
    reason: Literal["interrupted", "errored"]
    error: str | None = Field(default=None, max_length=10_000)


class JobReleaseResult(ResultBase):
    released: bool
    """False when the lease was no longer this worker's (committed, reaped, re-leased)."""
    outcome: Literal["requeued", "failed"] | None = None


# -- stage.pollSuspended ----------------------------------------------------
class StagePollSuspended(CommandBase):
    type: Literal["stage.pollSuspended"] = "stage.pollSuspended"
    max_checks: int = Field(default=50, ge=1, le=10_000)
    worker_id: str | None = Field(default=None, min_length=1)
    """The worker polling; with ``chain``, the worker a woken code workflow's activation
    is leased to."""
    chain: int = Field(default=0, ge=0, le=1000)
    """Lease the activation of up to this many code workflows whose timers fire to
    ``worker_id`` and commit its start in the firing transaction; the result returns
    them as ``chained_jobs``, which the caller must execute with ``job.execute`` (or
    release). ``0`` (the default), or no ``worker_id``: every woken activation is queued
    for any worker."""


class StagePollSuspendedResult(ResultBase):
    checked: int
    resumed: int
    failed: int
    resumed_workflow_run_ids: list[str]
    timed_out_workflow_run_ids: list[str] = Field(default_factory=list)
    """Runs this poll cancelled because their execution timeout passed."""
    chained_jobs: list[Job] = Field(default_factory=list)
    """With ``chain``: the woken activations' jobs leased to ``worker_id`` and started
    (stage RUNNING, ``stage:started`` committed with ``timer:fired``); execute each with
    ``job.execute``. Their runs are among ``resumed_workflow_run_ids``."""


# -- lease.reapStale --------------------------------------------------------
class LeaseReapStale(CommandBase):
    type: Literal["lease.reapStale"] = "lease.reapStale"
    stale_threshold: Duration = timedelta(seconds=60)


class LeaseReapStaleResult(ResultBase):
    released: int
    failed: int = 0


# -- run.reapStuck ----------------------------------------------------------
class RunReapStuck(CommandBase):
    type: Literal["run.reapStuck"] = "run.reapStuck"
    stuck_threshold: Duration = timedelta(minutes=30)
    max_runs: int = Field(default=100, ge=1)


class RunReapStuckResult(ResultBase):
    transitioned: int
    failed: int


# -- outbox -----------------------------------------------------------------
class OutboxFlush(CommandBase):
    type: Literal["outbox.flush"] = "outbox.flush"
    max_events: int = Field(default=100, ge=1, le=10_000)


class OutboxFlushResult(ResultBase):
    published: int
    failed: int = 0
    dead_lettered: int = 0


class PluginReplayDLQ(CommandBase):
    type: Literal["plugin.replayDLQ"] = "plugin.replayDLQ"
    max_events: int = Field(default=100, ge=1, le=10_000)


class PluginReplayDLQResult(ResultBase):
    replayed: int


# -- messages (code workflows) ----------------------------------------------
class RunSignal(CommandBase):
    type: Literal["run.signal"] = "run.signal"
    workflow_run_id: Text = Field(min_length=1)
    name: Text = Field(min_length=1)
    payload: JsonValue = None


class RunSignalResult(ResultBase):
    delivered: bool


class RunUpdate(CommandBase):
    type: Literal["run.update"] = "run.update"
    workflow_run_id: Text = Field(min_length=1)
    name: Text = Field(min_length=1)
    payload: JsonValue = None


class RunUpdateResult(ResultBase):
    update_id: str
    reply: JsonValue = None


class ReviewDecide(CommandBase):
    type: Literal["review.decide"] = "review.decide"
    workflow_run_id: Text = Field(min_length=1)
    review_id: Text = Field(min_length=1)
    decision: Literal["approved", "rejected"]
    reviewer: Text | None = None
    comment: Text | None = None


class ReviewDecideResult(ResultBase):
    recorded: bool


# -- schedules (cron) ---------------------------------------------------------
class ScheduleCreate(CommandBase, ScheduleSpec):
    """Create a cron schedule (``kernel/schedules.py``); its first fire time is the first
    after now. ``if_exists="update"``: an existing schedule of that id takes this spec
    instead (its pause state kept): how declared schedules are kept in step with code."""

    type: Literal["schedule.create"] = "schedule.create"
    schedule_id: Text = Field(min_length=1, max_length=128)
    paused: bool = False
    declared: bool = False
    if_exists: Literal["error", "update"] = "error"


class ScheduleCreateResult(ResultBase):
    schedule: Schedule
    created: bool = False
    """False with ``if_exists="update"`` when the schedule existed (it was updated)."""


class ScheduleUpdateResult(ResultBase):
    schedule: Schedule


class ScheduleUpdate(CommandBase):
    """Change a schedule: each field given replaces the stored one (``None``: unchanged,
    so ``input`` cannot be set to ``null`` here; delete and create instead). A new
    ``cron`` or ``timezone``, and ``paused=False``, set the next fire time to the first
    after now (fire times missed while paused are not caught up)."""

    type: Literal["schedule.update"] = "schedule.update"
    schedule_id: Text = Field(min_length=1, max_length=128)
    cron: Text | None = Field(default=None, min_length=1, max_length=200)
    timezone: Text | None = Field(default=None, min_length=1, max_length=64)
    input: JsonValue = None
    config: dict[str, JsonValue] | None = None
    priority: int | None = Field(default=None, ge=0, le=100)
    catchup: CatchupPolicy | None = None
    max_catchup: int | None = Field(default=None, ge=1, le=MAX_CATCHUP_LIMIT)
    misfire_grace: Duration | None = Field(default=None, ge=timedelta(0))
    overlap: OverlapPolicy | None = None
    paused: bool | None = None


class ScheduleDelete(CommandBase):
    type: Literal["schedule.delete"] = "schedule.delete"
    schedule_id: Text = Field(min_length=1, max_length=128)


class ScheduleDeleteResult(ResultBase):
    deleted: bool


class ScheduleTrigger(CommandBase):
    """Start a run of the schedule now, paused or not, under its overlap policy; its
    next fire time is unchanged. With ``idempotency_key``, a repeated trigger returns
    the first one's run."""

    type: Literal["schedule.trigger"] = "schedule.trigger"
    schedule_id: Text = Field(min_length=1, max_length=128)


class ScheduleTriggerResult(ResultBase):
    workflow_run_id: str | None
    """``None`` when the overlap policy ``skip`` left the previous run alone."""
    skipped: bool = False


class ScheduleFireDue(CommandBase):
    """Fire every due schedule (up to ``max_schedules``): the maintenance tick's step."""

    type: Literal["schedule.fireDue"] = "schedule.fireDue"
    max_schedules: int = Field(default=50, ge=1, le=10_000)


class ScheduleFireDueResult(ResultBase):
    schedules: int
    """Due schedules handled."""
    fired: int
    skipped: int
    """Fire times skipped (missed under the catch-up policy, or by overlap)."""
    workflow_run_ids: list[str]
    """The runs started, oldest fire time first per schedule."""


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One row of the command registry: a command model and the result model it returns.

    ``COMMANDS`` is the one place the command list is stated: the ``Command`` union,
    ``COMMAND_TYPES`` and ``RESULT_TYPES`` derive from it, and the unit tests check the
    kernel's handler table, ``Kernel.dispatch``'s typed overloads and the reference
    document against it (docs/architecture.md, "How to add a command")."""

    command: type[CommandBase]
    result: type[ResultBase]

    @property
    def type(self) -> str:
        """The command's wire name, the default of its ``type`` literal."""
        return str(self.command.model_fields["type"].default)


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(RunCreate, RunCreateResult),
    CommandSpec(RunCreateMany, RunCreateManyResult),
    CommandSpec(RunClaimPending, RunClaimPendingResult),
    CommandSpec(RunTransition, RunTransitionResult),
    CommandSpec(RunCancel, RunCancelResult),
    CommandSpec(RunRerunFrom, RunRerunFromResult),
    CommandSpec(RunPause, RunPauseResult),
    CommandSpec(RunResume, RunResumeResult),
    CommandSpec(RunTerminate, RunTerminateResult),
    CommandSpec(RunPurge, RunPurgeResult),
    CommandSpec(JobExecute, JobExecuteResult),
    CommandSpec(JobRelease, JobReleaseResult),
    CommandSpec(JobBegin, JobBeginResult),
    CommandSpec(JobComplete, JobCompleteResult),
    CommandSpec(JobFail, JobFailResult),
    CommandSpec(JobSuspend, JobSuspendResult),
    CommandSpec(JobHeartbeat, JobHeartbeatResult),
    CommandSpec(StagePollSuspended, StagePollSuspendedResult),
    CommandSpec(LeaseReapStale, LeaseReapStaleResult),
    CommandSpec(RunReapStuck, RunReapStuckResult),
    CommandSpec(OutboxFlush, OutboxFlushResult),
    CommandSpec(PluginReplayDLQ, PluginReplayDLQResult),
    CommandSpec(RunSignal, RunSignalResult),
    CommandSpec(RunUpdate, RunUpdateResult),
    CommandSpec(ReviewDecide, ReviewDecideResult),
    CommandSpec(ScheduleCreate, ScheduleCreateResult),
    CommandSpec(ScheduleUpdate, ScheduleUpdateResult),
    CommandSpec(ScheduleDelete, ScheduleDeleteResult),
    CommandSpec(ScheduleTrigger, ScheduleTriggerResult),
    CommandSpec(ScheduleFireDue, ScheduleFireDueResult),
)
"""The command registry, in the order the reference lists the commands."""

COMMAND_TYPES: dict[str, type[CommandBase]] = {spec.type: spec.command for spec in COMMANDS}
RESULT_TYPES: dict[str, type[ResultBase]] = {spec.type: spec.result for spec in COMMANDS}

if TYPE_CHECKING:
    # A type checker cannot build a union from data: statically a command is a
    # ``CommandBase`` (``Kernel.dispatch``'s overloads give each model its result type).
    Command: TypeAlias = CommandBase
else:
    # At run time, the discriminated union of the registry's models, which is what
    # validates a plain mapping by its ``type``.
    Command = Annotated[
        functools.reduce(operator.or_, (spec.command for spec in COMMANDS)),
        Field(discriminator="type"),
    ]

COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


def command_type(data: Any) -> str | None:
    if isinstance(data, CommandBase):
        return str(data.type)  # type: ignore[attr-defined]
    if isinstance(data, dict):
        value = data.get("type")
        return value if isinstance(value, str) else None
    return None
