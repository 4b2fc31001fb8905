"""Request and response bodies of the JSON API (pydantic; they make the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from treadle.kernel.events import Event
from treadle.kernel.model import Annotation, JsonValue, Run, RunStatus, StageRun
from treadle.kernel.workflows.model import JournalEntry, Timer

__all__ = [
    "ActionResult",
    "AggregateOut",
    "DeadLetterOut",
    "DecideReviewIn",
    "EventOut",
    "ForkIn",
    "QueryOut",
    "ReasonIn",
    "ReplayIn",
    "ReplayOut",
    "RerunIn",
    "RerunOut",
    "RunDetail",
    "RunPage",
    "RunSummary",
    "SignalIn",
    "SignalOut",
    "StartIn",
    "StartOrSignalIn",
    "StartOut",
    "UpdateIn",
    "UpdateOut",
    "WorkflowOut",
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSummary(BaseModel):
    """A run in a list: everything but its payloads and stages."""

    id: str
    workflow_id: str
    workflow_version: str
    status: RunStatus
    error: str | None = None
    priority: int
    paused: bool
    idempotency_key: str | None = None
    parent_run_id: str | None = None
    concurrency_key: str | None = None
    search_attributes: dict[str, JsonValue]
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime

    @classmethod
    def of(cls, run: Run) -> RunSummary:
        return cls(
            id=run.id,
            workflow_id=run.workflow_id,
            workflow_version=run.workflow_version,
            status=run.status,
            error=run.error,
            priority=run.priority,
            paused=run.paused and not run.status.terminal,
            idempotency_key=run.idempotency_key,
            parent_run_id=run.parent_run_id,
            concurrency_key=run.concurrency_key,
            search_attributes=run.search_attributes,
            created_at=run.created_at,
            started_at=run.started_at,
            completed_at=run.completed_at,
            updated_at=run.updated_at,
        )


class RunPage(BaseModel):
    """One page of runs, newest first. Pass ``next_cursor`` as ``cursor`` for the next
    page; ``null`` when this page is the last."""

    runs: list[RunSummary]
    next_cursor: str | None = None


class RunDetail(RunSummary):
    """One run with its input, output, config, stages, and for code workflows its journal
    and pending timers."""

    input: JsonValue = None
    output: JsonValue = None
    config: dict[str, JsonValue] = {}
    worker_id: str | None = None
    terminated: bool = False
    continued_from: str | None = None
    continued_as: str | None = None
    kind: Literal["pipeline", "code"] | None = None
    """Which authoring style the run's workflow uses (``None``: not registered here)."""
    stages: list[StageRun]
    journal: list[JournalEntry] = []
    timers: list[Timer] = []


class AggregateOut(BaseModel):
    by: Literal["status", "workflow_id"]
    counts: dict[str, int]
    total: int


class StartIn(_In):
    """Start a run. A repeated ``idempotency_key`` returns the run it started first."""

    workflow_id: str = Field(min_length=1)
    input: JsonValue = None
    idempotency_key: str | None = None
    priority: int = Field(default=5, ge=0, le=100)
    config: dict[str, JsonValue] | None = None
    run_id: str | None = None
    search_attributes: dict[str, JsonValue] | None = None
    concurrency_key: str | None = None
    execution_timeout: float | None = Field(default=None, gt=0)
    """Seconds (code workflows)."""


class StartOut(BaseModel):
    run_id: str
    status: RunStatus
    created: bool
    """False when ``idempotency_key`` named a run started before."""


class StartOrSignalIn(_In):
    """Deliver ``signal`` to the run with this idempotency key, starting it first if
    there is none (signal-with-start; code workflows)."""

    workflow_id: str = Field(min_length=1)
    input: JsonValue = None
    signal: str = Field(min_length=1)
    payload: JsonValue = None
    idempotency_key: str | None = None
    priority: int = Field(default=5, ge=0, le=100)
    config: dict[str, JsonValue] | None = None
    search_attributes: dict[str, JsonValue] | None = None


class SignalIn(_In):
    name: str = Field(min_length=1)
    payload: JsonValue = None
    idempotency_key: str | None = None


class SignalOut(BaseModel):
    delivered: bool


class UpdateIn(_In):
    name: str = Field(min_length=1)
    payload: JsonValue = None
    timeout: float = Field(default=30.0, gt=0, le=300)
    """Seconds to wait for the workflow's reply; past it the answer is 504 (the update
    stays delivered)."""
    idempotency_key: str | None = None


class UpdateOut(BaseModel):
    reply: JsonValue


class QueryOut(BaseModel):
    name: str
    value: JsonValue


class DecideReviewIn(_In):
    decision: Literal["approved", "rejected"]
    reviewer: str | None = None
    """Who decided; defaults to the caller's token name."""
    comment: str | None = None
    idempotency_key: str | None = None


class ReasonIn(_In):
    reason: str | None = None


class ActionResult(BaseModel):
    """What an action did: ``changed`` is false when the run was already so (cancelling
    a finished run, pausing a paused one, ...)."""

    run_id: str
    action: str
    changed: bool


class RerunIn(_In):
    stage_id: str = Field(min_length=1)
    config: dict[str, JsonValue] | None = None


class RerunOut(BaseModel):
    run_id: str
    from_stage_id: str
    deleted_stages: list[str]


class ForkIn(_In):
    from_step: str = Field(min_length=1)
    """A step of the run's journal (``name``, or ``name#2`` for its second occurrence)."""
    idempotency_key: str | None = None


class EventOut(BaseModel):
    """An event with its feed cursor (``id``: the run's event sequence for one run's
    events; the outbox row id for the all-runs feed)."""

    id: int
    event: Event


class DeadLetterOut(BaseModel):
    id: int
    attempts: int
    last_error: str | None = None
    event: Event


class ReplayIn(_In):
    max_events: int = Field(default=100, ge=1, le=10_000)


class ReplayOut(BaseModel):
    replayed: int


class WorkflowOut(BaseModel):
    id: str
    version: str
    kind: Literal["pipeline", "code"]
    description: str | None = None
    input_schema: dict[str, Any]
    """JSON Schema of the run input (``{}``: anything)."""
    stages: list[str]
    queues: list[str]


class AnnotationsOut(BaseModel):
    annotations: list[Annotation]
