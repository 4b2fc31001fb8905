"""Durable cron schedules: the stored ``Schedule``, ``define_schedule`` and the fire plan.

A schedule starts a run of one workflow at each fire time of a cron expression in a
timezone. The kernel keeps it pure: the cron arithmetic (which wall-clock times match,
how they map to instants across DST) sits behind the ``CronCalendar`` port
(``ports/cron.py``, ``adapters/cron.py`` with croniter and zoneinfo). What is decided
here, from a schedule, the calendar and the clock's ``now``, is which fire times are
due and which of them to fire under the catch-up policy (``plan_fires``).

Exactly one run per fire time: the run's idempotency key is ``schedule_run_key(id, t)``,
unique per workflow in storage, and the handler that fires holds the schedule's row
locked while it writes (``kernel/handlers/schedules.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from treadle.kernel.errors import DefinitionError, InvalidCommandError
from treadle.kernel.limits import Duration, Text
from treadle.kernel.model import JsonValue

if TYPE_CHECKING:
    from treadle.ports.cron import CronCalendar

CatchupPolicy = Literal["skip", "latest", "all"]
"""After downtime (no tick saw a fire time on time): ``skip`` fires only a fire time
still within ``misfire_grace``, ``latest`` fires the most recent missed one, ``all``
fires each missed one, at most ``max_catchup`` (the most recent)."""

OverlapPolicy = Literal["allow", "skip", "cancel_previous"]
"""When a fire time comes while the schedule's previous run is not finished: ``allow``
starts another, ``skip`` starts none (``schedule:skipped``), ``cancel_previous`` cancels
the previous run and starts the new one."""

SCHEDULE_ATTRIBUTE = "treadle.schedule_id"
"""Search attribute a scheduled run carries: the id of the schedule that started it."""
FIRE_TIME_ATTRIBUTE = "treadle.fire_time"
"""Search attribute a scheduled run carries: its fire time (ISO 8601, UTC)."""

DEFAULT_MISFIRE_GRACE = timedelta(minutes=5)
DEFAULT_MAX_CATCHUP = 10
MAX_CATCHUP_LIMIT = 1000
MISSED_COUNT_LIMIT = 100
"""Missed fire times counted after downtime, beyond those fired (a ``schedule:skipped``
event says ``missed_count=None`` past it): a calendar step costs a fraction of a
millisecond, so the first tick after a long outage stays cheap."""


def stream_id(schedule_id: str) -> str:
    """The outbox stream of a schedule's events (``workflow_run_id`` of ``schedule:*``
    events): they belong to no run, and are numbered per schedule like a run's."""
    return f"schedule:{schedule_id}"


def schedule_run_key(schedule_id: str, fire_time: datetime) -> str:
    """The idempotency key of the run a fire time starts: the same for every tick and
    worker that fires it, so storage's unique (workflow, key) admits one run."""
    return f"schedule:{schedule_id}@{fire_time.isoformat()}"


class ScheduleSpec(BaseModel):
    """What a user says about a schedule (``schedule.create`` takes these fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workflow_id: Text = Field(min_length=1)
    cron: Text = Field(min_length=1, max_length=200)
    timezone: Text = Field(default="UTC", min_length=1, max_length=64)
    input: JsonValue = None
    config: dict[str, JsonValue] = Field(default_factory=dict)
    priority: int = Field(default=5, ge=0, le=100)
    catchup: CatchupPolicy = "latest"
    max_catchup: int = Field(default=DEFAULT_MAX_CATCHUP, ge=1, le=MAX_CATCHUP_LIMIT)
    misfire_grace: Duration = Field(default=DEFAULT_MISFIRE_GRACE, ge=timedelta(0))
    overlap: OverlapPolicy = "allow"


class Schedule(ScheduleSpec):
    """A stored schedule: its spec plus state. ``next_fire_at`` is the earliest fire time
    not yet handled (``None`` while paused or when the expression never fires again)."""

    id: str
    paused: bool = False
    declared: bool = False
    """Made from code (``@workflow(schedule=...)``, ``define_schedule``) and kept in step
    with it when an engine opens; ``False`` for one made with ``engine.schedules.create``."""
    next_fire_at: datetime | None = None
    last_fire_at: datetime | None = None
    last_run_id: str | None = None
    created_at: datetime
    updated_at: datetime
    version: int = 0


SPEC_FIELDS: tuple[str, ...] = tuple(ScheduleSpec.model_fields)


@dataclass(frozen=True)
class ScheduleDefinition:
    """A schedule declared in code; an engine (or ``TestEngine``) opening with it creates
    it if absent and updates its spec if the code changed (pause state is kept)."""

    id: str
    spec: ScheduleSpec


def define_schedule(
    workflow_id: str,
    *,
    cron: str,
    input: Any = None,
    timezone: str = "UTC",
    id: str | None = None,
    config: dict[str, Any] | None = None,
    priority: int = 5,
    catchup: CatchupPolicy = "latest",
    max_catchup: int = DEFAULT_MAX_CATCHUP,
    misfire_grace: timedelta | float = DEFAULT_MISFIRE_GRACE,
    overlap: OverlapPolicy = "allow",
) -> ScheduleDefinition:
    """Declare a schedule of ``workflow_id`` (a pipeline or a code workflow) in code;
    pass it to ``Engine.open(..., schedules=[...])`` or ``TestEngine(schedules=[...])``.
    ``id`` defaults to the workflow id. The expression and timezone are checked when the
    engine opens (the calendar is an adapter); the fields' shapes are checked here."""
    try:
        spec = ScheduleSpec(
            workflow_id=workflow_id,
            cron=cron,
            timezone=timezone,
            input=input,
            config=config or {},
            priority=priority,
            catchup=catchup,
            max_catchup=max_catchup,
            misfire_grace=misfire_grace,
            overlap=overlap,
        )
    except ValidationError as exc:
        detail = InvalidCommandError.from_pydantic("define_schedule", exc)
        raise DefinitionError(f"schedule of {workflow_id!r}: {detail.message}") from None
    schedule_id = id if id is not None else workflow_id
    if not schedule_id:
        raise DefinitionError(f"schedule of {workflow_id!r}: id must be a non-empty string")
    return ScheduleDefinition(id=schedule_id, spec=spec)


def check_expression(calendar: CronCalendar, cron: str, timezone: str) -> None:
    """Refuse an expression or timezone the calendar cannot use, naming the field."""
    try:
        calendar.check(cron, timezone)
    except ValueError as exc:
        text = str(exc)
        where = "timezone" if text.startswith("timezone") else "cron"
        raise InvalidCommandError(f"invalid schedule: {text}", [(where, text)]) from None


@dataclass(frozen=True)
class FirePlan:
    """What to do with a due schedule at ``now``: fire ``fire`` (oldest first), report
    ``missed`` (due fire times not fired: ``missed_latest`` the newest of them,
    ``missed_since`` the oldest, ``missed_count`` how many, ``None`` when more than
    were counted), then wait for ``next_fire_at``."""

    fire: tuple[datetime, ...]
    missed_since: datetime | None
    missed_latest: datetime | None
    missed_count: int | None
    next_fire_at: datetime | None


def plan_fires(calendar: CronCalendar, schedule: Schedule, now: datetime) -> FirePlan:
    """The fire plan of ``schedule`` at ``now`` under its catch-up policy. The due fire
    times are those in ``[next_fire_at, now]``; they are found newest first, at most
    the fires kept plus ``MISSED_COUNT_LIMIT`` of them (a week of downtime of a
    per-minute schedule costs about a hundred calendar steps, not ten thousand)."""
    start = schedule.next_fire_at
    upcoming = calendar.next_after(schedule.cron, schedule.timezone, now)
    if start is None or start > now:
        return FirePlan((), None, None, 0, upcoming if start is None else start)
    keep = schedule.max_catchup if schedule.catchup == "all" else 1
    due: list[datetime] = []  # newest first
    cursor = calendar.previous_before(schedule.cron, schedule.timezone, now + _TICK)
    walk = keep + MISSED_COUNT_LIMIT
    while cursor is not None and cursor >= start and len(due) <= walk:
        due.append(cursor)
        cursor = calendar.previous_before(schedule.cron, schedule.timezone, cursor)
    if not due:  # next_fire_at was stale (expression changed): nothing matched since
        return FirePlan((), None, None, 0, upcoming)
    fired = due[:keep]
    if schedule.catchup == "skip" and now - fired[0] > schedule.misfire_grace:
        fired = []
    missed = due[len(fired) :]
    return FirePlan(
        fire=tuple(reversed(fired)),
        missed_since=start if missed else None,
        missed_latest=missed[0] if missed else None,
        missed_count=(None if len(due) > walk else len(missed)) if missed else 0,
        next_fire_at=upcoming,
    )


_TICK = timedelta(microseconds=1)
"""``previous_before(now + _TICK)``: the latest fire time at or before ``now``."""
