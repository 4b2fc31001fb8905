"""The stored shapes: runs, stages, jobs, logs, annotations, outbox rows.

These are plain frozen pydantic models so every adapter stores and returns the
same typed values. State changes produce new instances (``evolve``); the
``version`` field is the optimistic-concurrency guard the SQL adapters check.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from treadle.kernel.errors import PayloadMissingError

JsonValue = Any
"""A value that survives ``json.dumps``/``json.loads`` unchanged."""


@dataclass(frozen=True, slots=True)
class MissingPayload:
    """Stands in for a JSON value (a run's input or output, a stage's output or state)
    that storage offloaded to the blob store and whose blob is gone.

    A read that serves many runs (a claim, a listing, a group commit) returns it rather
    than failing for every run; writing it back keeps the reference it was read from, so
    cancelling or failing the run loses nothing. Whatever needs the value itself (the
    claim of a run, a stage's input, ``ctx.require``, a check of a suspended stage)
    fails that run or stage with ``error()``, a ``PayloadMissingError``."""

    key: str
    """The blob store key the value was offloaded to."""
    size: int | None = None
    run_id: str | None = None

    def error(self) -> PayloadMissingError:
        return PayloadMissingError(self.run_id, self.key)

    def __str__(self) -> str:
        return f"<payload missing: {self.key}>"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RunStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_RUN


_TERMINAL_RUN = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


class StageStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_STAGE

    @property
    def succeeded(self) -> bool:
        return self in (StageStatus.COMPLETED, StageStatus.SKIPPED)


_TERMINAL_STAGE = frozenset(
    {StageStatus.COMPLETED, StageStatus.FAILED, StageStatus.CANCELLED, StageStatus.SKIPPED}
)


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    LEASED = "LEASED"
    SUSPENDED = "SUSPENDED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def live(self) -> bool:
        return self in (JobStatus.QUEUED, JobStatus.LEASED, JobStatus.SUSPENDED)


class StageRun(_Frozen):
    """One stage of one run, as stored and as shown to users."""

    workflow_run_id: str
    stage_id: str
    execution_group: int
    status: StageStatus = StageStatus.PENDING
    attempt: int = 0
    output: JsonValue = None
    error: str | None = None
    retryable: bool | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    suspended_state: JsonValue = None
    next_poll_at: datetime | None = None
    poll_interval: timedelta | None = None
    suspend_deadline: datetime | None = None
    resume_state: JsonValue = None
    job_id: str | None = None
    check_failures: int = 0
    """Consecutive ``check_completion`` calls of this suspension that raised."""
    error_traceback: str | None = None
    """With ``error``: where the failing attempt raised it, shortened to the user's frames
    (``kernel.errors.short_traceback``; at most ``MAX_TRACEBACK_CHARS``). ``None`` when the
    error is Treadle's own (a timeout, a lost lease) or the stage has not failed."""
    version: int = 0


CONTINUED_FROM = "continued_from"
"""Search attribute of a run made by ``ctx.continue_as_new``: the run it continues."""
CONTINUED_AS = "continued_as"
"""Search attribute of a run that continued as new: the run that continues it."""
RESERVED_ATTRIBUTES = frozenset({CONTINUED_FROM, CONTINUED_AS})
"""Search attributes only Treadle sets (``run.create`` and ``set_attribute`` refuse them)."""


class Run(_Frozen):
    """One execution of a workflow. ``stages`` is filled by readers that ask for it."""

    id: str
    workflow_id: str
    workflow_version: str = "1"
    status: RunStatus = RunStatus.PENDING
    input: JsonValue = None
    config: dict[str, JsonValue] = Field(default_factory=dict)
    output: JsonValue = None
    error: str | None = None
    priority: int = 5
    idempotency_key: str | None = None
    parent_run_id: str | None = None
    search_attributes: dict[str, JsonValue] = Field(default_factory=dict)
    concurrency_key: str | None = None
    """Runs sharing it share their workflow's per-key concurrency and rate limits."""
    trace_context: str | None = None
    """The W3C ``traceparent`` of the trace this run belongs to (captured at its start
    when tracing is on, handed to its children and continue-as-new successors): every
    span of its stages, on any worker, joins that trace."""
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime
    worker_id: str | None = None
    current_group: int = -1
    """Highest execution group whose jobs have been enqueued (-1: none yet)."""
    paused: bool = False
    """``run.pause``: no new stage or step starts until ``run.resume`` (the status stays
    what it was; see docs/lifecycle.md). Meaningless once the run is terminal."""
    terminated: bool = False
    """A CANCELLED run that ``run.terminate`` ended: it runs no compensations."""
    version: int = 0
    stages: list[StageRun] = Field(default_factory=list)
    total_cost: Decimal = Decimal(0)
    """What the run's AI calls cost so far, failed attempts included (``kernel/ai.py``).
    Kept by the ``AICallLogger`` port, not in the run's row: readers that show runs
    (``Engine.get_run``, ``Engine.list``) fill it in; inside the kernel it reads 0."""
    total_tokens: int = 0
    """Input plus output tokens of the run's AI calls so far (filled in like ``total_cost``)."""
    max_cost: Decimal | None = None
    """The run's AI budget, if it has one (filled in like ``total_cost``)."""

    @property
    def continued_from(self) -> str | None:
        """The run this one continues (``ctx.continue_as_new``), if any: the search
        attribute ``continued_from``, set by Treadle."""
        value = self.search_attributes.get(CONTINUED_FROM)
        return value if isinstance(value, str) else None

    @property
    def continued_as(self) -> str | None:
        """The run that continues this one (``ctx.continue_as_new``), if it continued:
        the search attribute ``continued_as``, set by Treadle. Such a run is COMPLETED
        with no output of its own; the logical workflow's result is the chain's last."""
        value = self.search_attributes.get(CONTINUED_AS)
        return value if isinstance(value, str) else None

    @property
    def duration(self) -> timedelta | None:
        """Wall time from ``started_at`` (not ``created_at``) to completion."""
        if self.started_at is None or self.completed_at is None:
            return None
        return self.completed_at - self.started_at


class Job(_Frozen):
    """A queued request to execute one stage; owned by the JobTransport."""

    id: str
    workflow_run_id: str
    workflow_id: str
    stage_id: str
    status: JobStatus = JobStatus.QUEUED
    priority: int = 5
    attempts: int = 0
    max_attempts: int = 3
    next_poll_at: datetime
    enqueued_at: datetime
    worker_id: str | None = None
    heartbeat_at: datetime | None = None
    last_error: str | None = None
    sequence: int = 0
    """Monotonic enqueue order; FIFO tie-break after priority."""
    queue: str = "default"
    """The named queue it waits on (its stage's, ``kernel/queues.py``); only a worker
    serving that queue leases it."""


class WorkerInfo(_Frozen):
    """A live worker process as it announces itself (``WorkerRegistry.beat``): which
    queues it serves and when it was last seen, so ``doctor`` and ``engine.queues()`` can
    tell a queue that waits for a worker from one that is merely busy."""

    worker_id: str
    queues: tuple[str, ...]
    host: str = ""
    pid: int = 0
    started_at: datetime
    heartbeat_at: datetime


class QueueDepth(_Frozen):
    """The jobs of one named queue by state, as ``WorkerRegistry.queue_depths`` counts them."""

    queue: str
    queued: int = 0
    """QUEUED and due now: waiting for a free worker of this queue."""
    scheduled: int = 0
    """QUEUED but due later (retry backoff, delayed activations)."""
    leased: int = 0
    """Held by a worker right now."""
    oldest_due_at: datetime | None = None
    """When the longest-waiting due job became available (its wait is now minus this)."""


class QueueInfo(QueueDepth):
    """One named queue as ``engine.queues()`` reports it: its jobs, the live workers that
    serve it, and whether this app's workflows send work to it."""

    workers: tuple[str, ...] = ()
    """Ids of the workers that beat within the liveness window and serve this queue."""
    declared: bool = False
    """A registered workflow (of the engine asking) routes stages to this queue."""

    @property
    def unserved(self) -> bool:
        """Jobs are due on it and no live worker serves it: they wait until one starts."""
        return self.queued > 0 and not self.workers


class LogRecord(_Frozen):
    workflow_run_id: str
    stage_id: str | None
    level: str
    message: str
    fields: dict[str, JsonValue] = Field(default_factory=dict)
    timestamp: datetime


class Annotation(_Frozen):
    """A provenance record attached to a run; its attributes are search attributes."""

    id: str
    workflow_run_id: str
    attributes: dict[str, JsonValue]
    actor: str | None = None
    scope: str | None = None
    stage_id: str | None = None
    idempotency_key: str | None = None
    created_at: datetime


class IdempotencyState(StrEnum):
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


class IdempotencyRecord(_Frozen):
    key: str
    command_type: str
    state: IdempotencyState
    result: JsonValue = None
    started_at: datetime


class RunFilter(_Frozen):
    """What ``list_runs`` selects; every field narrows the result."""

    status: RunStatus | None = None
    statuses: frozenset[RunStatus] = frozenset()
    """Any one of these statuses (empty: no constraint); ``Engine.list(status=[...])``."""
    workflow_id: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    updated_after: datetime | None = None
    """Inclusive, like ``created_after``."""
    updated_before: datetime | None = None
    """Exclusive, like ``created_before``."""
    attributes: dict[str, JsonValue] = Field(default_factory=dict)
    parent_run_id: str | None = None
    after: tuple[datetime, str] | None = None
    """Keyset pagination: only runs that come after ``(created_at, id)`` in the list's
    newest-first order, i.e. strictly older (``Engine.list(after=...)``)."""
    payloads: bool = True
    """False: the runs come without ``input`` and ``output`` (``None``), which a listing
    does not show, so no offloaded payload is fetched from the blob store for them."""
    paused: bool | None = None
    """True: only paused runs that have not ended (``run.pause``); False: only the others."""
    limit: int = 50
    offset: int = 0


M = TypeVar("M", bound=BaseModel)

# The slot setters of pydantic's BaseModel, looked up once: ``evolve`` runs about a dozen
# times per stage and object.__setattr__ would find them by name each time.
_new = object.__new__
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


# Per-class facts ``evolve`` and ``construct`` need, keyed by the class itself: a dict
# lookup by type is several times cheaper than reading the class's own ``__dict__``,
# which goes through pydantic's metaclass ``__getattr__`` hook.
_ALL_FIELDS: dict[type[BaseModel], set[str] | None] = {}


def _remember_all_fields(cls: type[BaseModel]) -> set[str] | None:
    """One set of every field name per frozen model class (``None`` for a mutable one).
    Shared between instances, which only a frozen model allows: pydantic adds to the set
    on attribute assignment, and copies it in ``model_copy``."""
    shared = set(cls.model_fields) if cls.model_config.get("frozen") else None
    _ALL_FIELDS[cls] = shared
    return shared


def evolve(model: M, update: dict[str, Any]) -> M:
    """A copy of a frozen model with ``update`` applied, without re-validation.

    Same contract as ``model.model_copy(update=...)`` (callers pass already-valid
    values), at about half the cost: state changes on the hot path of every stage
    go through here. The copy counts every field as explicitly set, as a row read
    back from a SQL adapter does; sharing that one set per class instead of building a
    new one per copy keeps the garbage collector's work down.
    """
    cls = type(model)
    new = _new(cls)
    _set_dict(new, model.__dict__ | update)  # one new dict: the copy and the update at once
    try:  # (``try`` costs nothing in 3.11 until it catches: fewer steps than ``get``)
        fields_set = _ALL_FIELDS[cls]
    except KeyError:
        fields_set = _remember_all_fields(cls)
    if fields_set is None:
        fields_set = model.__pydantic_fields_set__.union(update)
    _set_fields_set(new, fields_set)
    _set_extra(new, None)
    _set_private(new, None)
    return new


_REQUIRED = object()


_Shape = tuple[dict[str, Any], frozenset[str], set[str] | None]
_SHAPES: dict[type[BaseModel], _Shape] = {}


def _remember_shape(cls: type[BaseModel]) -> _Shape:
    """Per class: every field in declaration order with its default (or a
    marker for a required one), the required names, and the shared field set of a frozen
    class (``_ALL_FIELDS``), all in one lookup. Fields with a ``default_factory`` are left
    out of ``construct``'s reach (it refuses the class)."""
    template: dict[str, Any] = {}
    required: set[str] = set()
    for name, info in cls.model_fields.items():
        if info.default_factory is not None:
            raise TypeError(f"construct() does not fill {cls.__name__}.{name}'s default_factory")
        if info.is_required():
            template[name] = _REQUIRED
            required.add(name)
        else:
            template[name] = info.default
    fields_set = _ALL_FIELDS[cls] if cls in _ALL_FIELDS else _remember_all_fields(cls)
    shape: _Shape = (template, frozenset(required), fields_set)
    _SHAPES[cls] = shape
    return shape


def construct(cls: type[M], values: dict[str, Any]) -> M:
    """A frozen model built from ``values`` the kernel made itself (its own ids, clock
    readings, enum members), without pydantic's validation: about a third of the cost of
    ``cls(**values)``, and faster than ``model_construct``, whose per-field loop runs in
    Python. Missing fields take their (immutable) defaults; a missing required field or
    an unknown one is still an error, so only types go unchecked, as in ``evolve``. For
    values from outside (user input, stored JSON) call the class."""
    try:
        template, required, fields_set = _SHAPES[cls]
    except KeyError:
        template, required, fields_set = _remember_shape(cls)
    full = template | values  # declaration order, as validation would produce
    # Key checks only: ``_REQUIRED in full.values()`` would compare the marker with every
    # value (``datetime.__eq__`` and all) on each of the several models built per stage.
    if len(full) != len(template) or not values.keys() >= required:
        missing = sorted(required - values.keys())
        unknown = sorted(values.keys() - template.keys())
        raise TypeError(f"{cls.__name__}: missing {missing}, unknown {unknown}")
    new = _new(cls)
    _set_dict(new, full)
    _set_fields_set(new, fields_set if fields_set is not None else set(values))
    _set_extra(new, None)
    _set_private(new, None)
    return new
