"""Domain events: past-tense facts appended to the outbox with each state change.

Every event is a frozen pydantic model with a ``Literal`` ``type``; the union
``Event`` parses stored JSON back into the same typed model (``parse_event``),
so no adapter ever hands out raw dictionaries.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from treadle.kernel.model import JsonValue


class EventBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    workflow_run_id: str
    sequence: int = 0
    """Per-run, gap-free; assigned by persistence when the event is appended."""
    causation_id: str | None = None
    timestamp: datetime


class WorkflowCreated(EventBase):
    type: Literal["workflow:created"] = "workflow:created"
    workflow_id: str
    priority: int
    forked_from: str | None = None
    """For a run made by ``fork``: the run whose journal it reuses."""
    forked_from_step: str | None = None
    """For a fork: the step (``name#occurrence``) from which it runs afresh."""


class WorkflowStarted(EventBase):
    type: Literal["workflow:started"] = "workflow:started"
    workflow_id: str
    worker_id: str | None = None
    rerun_from_stage_id: str | None = None


class WorkflowSuspended(EventBase):
    type: Literal["workflow:suspended"] = "workflow:suspended"
    waiting_for: str | None = None
    """What the run waits for, in words: ``sleep until T``, ``signal NAME``, ``update
    NAME``, ``review``, ``child RUN``, ``retry of step NAME at T``, ``batch poll at T``
    (several joined by ``; ``), each wait with a timeout followed by ``(timeout at T)``.
    ``None`` on events stored before it existed."""


class WorkflowCompleted(EventBase):
    type: Literal["workflow:completed"] = "workflow:completed"
    output: JsonValue = None
    duration: timedelta | None = None


class WorkflowContinuedAsNew(EventBase):
    """The run ended by ``ctx.continue_as_new``: it is COMPLETED without an output, and
    the logical workflow goes on as run ``continued_as`` (its first event is
    ``workflow:created``). Ends the run for waiters, as ``workflow:completed`` does."""

    type: Literal["workflow:continuedAsNew"] = "workflow:continuedAsNew"
    workflow_id: str
    continued_as: str
    """The id of the new run, which pins the workflow version registered when it was
    created."""
    workflow_version: str
    """The version the new run pinned."""
    duration: timedelta | None = None


class WorkflowFailed(EventBase):
    type: Literal["workflow:failed"] = "workflow:failed"
    error: str
    stage_id: str | None = None
    duration: timedelta | None = None


class WorkflowCancelled(EventBase):
    type: Literal["workflow:cancelled"] = "workflow:cancelled"
    reason: str | None = None


class WorkflowPaused(EventBase):
    """``run.pause``: no new stage or step of the run starts until it is resumed."""

    type: Literal["workflow:paused"] = "workflow:paused"
    reason: str | None = None


class WorkflowResumed(EventBase):
    """``run.resume``: the paused run goes on from where it stopped."""

    type: Literal["workflow:resumed"] = "workflow:resumed"
    reason: str | None = None


class WorkflowTerminated(EventBase):
    """``run.terminate``: the run ended at once (status CANCELLED) without compensations."""

    type: Literal["workflow:terminated"] = "workflow:terminated"
    reason: str | None = None


class StageStarted(EventBase):
    type: Literal["stage:started"] = "stage:started"
    stage_id: str
    attempt: int
    worker_id: str | None = None


class StageProgress(EventBase):
    type: Literal["stage:progress"] = "stage:progress"
    stage_id: str
    fraction: float
    message: str | None = None


class StageSuspended(EventBase):
    type: Literal["stage:suspended"] = "stage:suspended"
    stage_id: str
    next_poll_at: datetime


class StageCompleted(EventBase):
    type: Literal["stage:completed"] = "stage:completed"
    stage_id: str
    attempt: int
    output: JsonValue = None
    duration: timedelta | None = None


class StageFailed(EventBase):
    type: Literal["stage:failed"] = "stage:failed"
    stage_id: str
    attempt: int
    error: str
    will_retry: bool = False
    retry_at: datetime | None = None
    traceback: str | None = None
    """Where the body raised ``error``, shortened to the user's frames (``None`` for an
    error of Treadle's own, and on events stored before it existed)."""


class SignalReceived(EventBase):
    type: Literal["signal:received"] = "signal:received"
    name: str
    payload: JsonValue = None


class UpdateReceived(EventBase):
    """An update was delivered to a code workflow's inbox (``run.update``)."""

    type: Literal["update:received"] = "update:received"
    name: str
    update_id: str
    payload: JsonValue = None


class UpdateReplied(EventBase):
    """The body answered an update; ``engine.update`` returns ``reply``."""

    type: Literal["update:replied"] = "update:replied"
    name: str
    update_id: str
    reply: JsonValue = None


class StepCompleted(EventBase):
    """A code workflow's step committed its result to the journal."""

    type: Literal["step:completed"] = "step:completed"
    step: str
    occurrence: int
    attempt: int
    output: JsonValue = None
    duration: timedelta | None = None


class StepFailed(EventBase):
    """One attempt of a code workflow's step failed; ``will_retry`` says whether another
    attempt follows (at ``retry_at``)."""

    type: Literal["step:failed"] = "step:failed"
    step: str
    occurrence: int
    attempt: int
    error: str
    will_retry: bool = False
    retry_at: datetime | None = None
    traceback: str | None = None
    """Where the step function raised ``error``, shortened to the user's frames."""


class TimerFired(EventBase):
    """A durable timer of a code workflow fell due (``purpose``: sleep, signal_timeout,
    retry)."""

    type: Literal["timer:fired"] = "timer:fired"
    step: str
    occurrence: int
    purpose: str
    fire_at: datetime


class SagaCompensated(EventBase):
    """A code workflow's saga ran its compensations, newest first, after the run failed
    or was cancelled (``trigger``). ``compensated`` lists those that succeeded, in the
    order they ran; ``failed`` maps each that failed for good to its error."""

    type: Literal["saga:compensated"] = "saga:compensated"
    trigger: Literal["failed", "cancelled"]
    compensated: list[str] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)


class AttributeSet(EventBase):
    """A code workflow's ``ctx.set_attribute`` committed a search attribute (``value``
    ``None`` stores a JSON null; it does not delete the key)."""

    type: Literal["attribute:set"] = "attribute:set"
    key: str
    value: JsonValue = None


class VersionMismatched(EventBase):
    """A code workflow run could not resume: this worker lacks its pinned version. The run
    is SUSPENDED with ``error``, not failed, and is re-checked until a worker with
    ``pinned_version`` resumes it."""

    type: Literal["version:mismatched"] = "version:mismatched"
    workflow_id: str
    pinned_version: str
    registered_version: str
    error: str


class ReviewRequested(EventBase):
    type: Literal["review:requested"] = "review:requested"
    review_id: str
    review_type: str | None = None
    reviewers: list[str] = Field(default_factory=list)


class ReviewDecided(EventBase):
    type: Literal["review:decided"] = "review:decided"
    review_id: str
    decision: str
    reviewer: str | None = None


class ChildStarted(EventBase):
    """Recorded on the parent when ``ctx.child`` created a child run."""

    type: Literal["child:started"] = "child:started"
    child_run_id: str
    child_workflow_id: str
    occurrence: int


class ChildFinished(EventBase):
    """Recorded on the parent when a child run it awaits ended (``status``: COMPLETED,
    FAILED or CANCELLED)."""

    type: Literal["child:finished"] = "child:finished"
    child_run_id: str
    child_workflow_id: str
    status: str
    error: str | None = None


class AnnotationCreated(EventBase):
    type: Literal["annotation:created"] = "annotation:created"
    annotation_id: str
    attributes: dict[str, JsonValue]
    actor: str | None = None
    scope: str | None = None
    stage_id: str | None = None


class ScheduleFired(EventBase):
    """A schedule started a run (stream ``schedule:<id>``, see ``kernel/schedules.py``)."""

    type: Literal["schedule:fired"] = "schedule:fired"
    schedule_id: str
    fire_time: datetime
    run_id: str
    workflow_id: str
    manual: bool = False
    """Started by ``schedule.trigger`` (``fire_time`` is then the trigger's time)."""


class ScheduleSkipped(EventBase):
    """A fire time passed without a run: ``missed`` (catch-up policy after downtime) or
    ``overlap`` (the previous run was still going and the overlap policy is ``skip``)."""

    type: Literal["schedule:skipped"] = "schedule:skipped"
    schedule_id: str
    fire_time: datetime
    """The (newest) fire time skipped."""
    reason: Literal["missed", "overlap"]
    missed_since: datetime | None = None
    """``missed``: the oldest fire time skipped."""
    missed_count: int | None = None
    """``missed``: how many were skipped (``None``: more than the catch-up bound counted)."""
    run_id: str | None = None
    """``overlap``: the run still going."""


class ScheduleChanged(EventBase):
    """A schedule was created, updated, paused, resumed or deleted."""

    type: Literal["schedule:changed"] = "schedule:changed"
    schedule_id: str
    change: Literal["created", "updated", "paused", "resumed", "deleted"]
    next_fire_at: datetime | None = None


Event = Annotated[
    WorkflowCreated
    | WorkflowStarted
    | WorkflowSuspended
    | WorkflowCompleted
    | WorkflowContinuedAsNew
    | WorkflowFailed
    | WorkflowCancelled
    | WorkflowPaused
    | WorkflowResumed
    | WorkflowTerminated
    | StageStarted
    | StageProgress
    | StageSuspended
    | StageCompleted
    | StageFailed
    | SignalReceived
    | UpdateReceived
    | UpdateReplied
    | StepCompleted
    | StepFailed
    | TimerFired
    | SagaCompensated
    | AttributeSet
    | VersionMismatched
    | ReviewRequested
    | ReviewDecided
    | ChildStarted
    | ChildFinished
    | AnnotationCreated
    | ScheduleFired
    | ScheduleSkipped
    | ScheduleChanged,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


RUN_END_EVENTS = frozenset(
    {
        "workflow:completed",
        "workflow:continuedAsNew",
        "workflow:failed",
        "workflow:cancelled",
        "workflow:terminated",
        "saga:compensated",
    }
)
"""Event types after which a run may be finished for a waiter (``RunHandle.result``):
the run reached a terminal status, or a cancelled run's compensations are done.
Adapters tell in-process watchers about them once their transaction commits."""


def parse_event(data: Any) -> EventBase:
    """Parse stored JSON (a mapping or a JSON string) into its typed event."""
    if isinstance(data, str | bytes):
        return EVENT_ADAPTER.validate_json(data)
    return EVENT_ADAPTER.validate_python(data)


def dump_event(event: EventBase) -> str:
    """The JSON text adapters store; ``parse_event`` reverses it exactly."""
    return event.model_dump_json()


class OutboxRecord(BaseModel):
    """An outbox row: the event plus its publication bookkeeping."""

    model_config = ConfigDict(frozen=True)

    id: int
    event: Event
    attempts: int = 0
    published: bool = False
    dead_lettered: bool = False
    last_error: str | None = None
    retry_at: datetime | None = None
    """After a failed publish: not retried before this time (``outbox.flush`` skips the
    run until then, keeping its order)."""
