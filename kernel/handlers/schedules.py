"""Cron schedule handlers: create, update, delete, trigger, and fire the due ones.

A fire holds the schedule's row locked (``tx.schedules.get(..., for_update=True)``)
and writes, in one transaction, the runs it starts, the schedule's next fire time and
the ``schedule:*`` events. Two ticks that fire the same schedule at once therefore take
turns, and the second finds the fire time handled; the run's idempotency key
(``schedule_run_key``: schedule id + fire time, unique per workflow in storage) is the
second guard, so a fire time never has two runs, whichever hosts tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import treadle.kernel.commands as c
from treadle.kernel.errors import (
    ConcurrencyError,
    DuplicateError,
    NotSupportedError,
    ScheduleNotFoundError,
    describe_exception,
)
from treadle.kernel.events import EventBase, ScheduleChanged, ScheduleFired, ScheduleSkipped
from treadle.kernel.handlers.runs import cancel_in, start_in, validate_run
from treadle.kernel.model import JsonValue, evolve
from treadle.kernel.schedules import (
    FIRE_TIME_ATTRIBUTE,
    SCHEDULE_ATTRIBUTE,
    SPEC_FIELDS,
    Schedule,
    check_expression,
    plan_fires,
    schedule_run_key,
    stream_id,
)

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps, Scope
    from treadle.ports import Transaction
    from treadle.ports.cron import CronCalendar


def calendar(deps: Deps) -> CronCalendar:
    if deps.cron is None:
        raise NotSupportedError(
            "this kernel has no cron calendar: pass cron=CroniterCalendar() "
            "(treadle.adapters.cron) to create_kernel"
        )
    return deps.cron


def _changed(
    schedule_id: str, change: Any, now: datetime, causation: str | None, nxt: datetime | None
) -> ScheduleChanged:
    return ScheduleChanged(
        workflow_run_id=stream_id(schedule_id),
        timestamp=now,
        causation_id=causation,
        schedule_id=schedule_id,
        change=change,
        next_fire_at=nxt,
    )


def _checked_payload(
    deps: Deps, workflow_id: str, input: JsonValue, config: dict[str, JsonValue]
) -> tuple[JsonValue, dict[str, JsonValue]]:
    """The schedule's input and config as runs of its workflow will take them."""
    return validate_run(deps.workflow(workflow_id), input, config, {})


async def create(deps: Deps, cmd: c.ScheduleCreate, scope: Scope) -> c.ScheduleCreateResult:
    """Check everything (expression, timezone, workflow, input, config) before the
    transaction, so a bad schedule writes nothing."""
    cal = calendar(deps)
    check_expression(cal, cmd.cron, cmd.timezone)
    input_json, config_json = _checked_payload(deps, cmd.workflow_id, cmd.input, cmd.config)
    spec = {name: getattr(cmd, name) for name in SPEC_FIELDS}
    spec.update(input=input_json, config=config_json)
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.ScheduleCreateResult", cached)
        existing = await tx.schedules.get(cmd.schedule_id, for_update=True)
        if existing is not None:
            if cmd.if_exists == "error":
                raise DuplicateError(f"schedule {cmd.schedule_id!r} already exists")
            result = c.ScheduleCreateResult(
                schedule=await _respec(deps, tx, existing, spec, scope, now), created=False
            )
        else:
            nxt = None if cmd.paused else cal.next_after(cmd.cron, cmd.timezone, now)
            schedule = Schedule(
                id=cmd.schedule_id,
                paused=cmd.paused,
                declared=cmd.declared,
                next_fire_at=nxt,
                created_at=now,
                updated_at=now,
                **spec,
            )
            await tx.schedules.insert(schedule)
            await tx.outbox.append([_changed(schedule.id, "created", now, scope.causation_id, nxt)])
            result = c.ScheduleCreateResult(schedule=schedule, created=True)
        await scope.complete(tx, result)
    return result


async def _respec(
    deps: Deps,
    tx: Transaction,
    current: Schedule,
    spec: dict[str, Any],
    scope: Scope,
    now: datetime,
    paused: bool | None = None,
) -> Schedule:
    """``current`` with ``spec``'s fields (and ``paused`` if given); written, with its
    events, only if something changed. A new expression or timezone, or a resume, makes
    the next fire time the first after now."""
    changed = {k: v for k, v in spec.items() if getattr(current, k) != v}
    pause_change = paused is not None and paused != current.paused
    if not changed and not pause_change:
        return current
    is_paused = current.paused if paused is None else paused
    updates: dict[str, Any] = dict(changed, updated_at=now, paused=is_paused)
    if is_paused:
        updates["next_fire_at"] = None
    elif pause_change or "cron" in changed or "timezone" in changed:
        cron, tz = spec.get("cron", current.cron), spec.get("timezone", current.timezone)
        updates["next_fire_at"] = calendar(deps).next_after(cron, tz, now)
    if "workflow_id" in changed:
        updates["last_run_id"] = None  # overlap is judged among one workflow's runs
    stored = await tx.schedules.update(current.model_copy(update=updates))
    events: list[EventBase] = []
    if changed:
        events.append(_changed(stored.id, "updated", now, scope.causation_id, stored.next_fire_at))
    if pause_change:
        change = "paused" if is_paused else "resumed"
        events.append(_changed(stored.id, change, now, scope.causation_id, stored.next_fire_at))
    await tx.outbox.append(events)
    return stored


async def update(deps: Deps, cmd: c.ScheduleUpdate, scope: Scope) -> c.ScheduleUpdateResult:
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.ScheduleUpdateResult", cached)
        current = await _load(tx, cmd.schedule_id)
        spec = {
            name: getattr(cmd, name)
            for name in SPEC_FIELDS
            if name in type(cmd).model_fields and getattr(cmd, name) is not None
        }
        if "cron" in spec or "timezone" in spec:
            check_expression(
                calendar(deps),
                spec.get("cron", current.cron),
                spec.get("timezone", current.timezone),
            )
        if "input" in spec or "config" in spec:
            spec["input"], spec["config"] = _checked_payload(
                deps,
                current.workflow_id,
                spec.get("input", current.input),
                spec.get("config", current.config),
            )
        stored = await _respec(deps, tx, current, spec, scope, now, paused=cmd.paused)
        result = c.ScheduleUpdateResult(schedule=stored)
        await scope.complete(tx, result)
    return result


async def _load(tx: Transaction, schedule_id: str) -> Schedule:
    found = await tx.schedules.get(schedule_id, for_update=True)
    if found is None:
        raise ScheduleNotFoundError(f"no schedule with id {schedule_id!r}")
    return found


async def delete(deps: Deps, cmd: c.ScheduleDelete, scope: Scope) -> c.ScheduleDeleteResult:
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.ScheduleDeleteResult", cached)
        deleted = await tx.schedules.delete(cmd.schedule_id)
        if deleted:
            await tx.outbox.append(
                [_changed(cmd.schedule_id, "deleted", now, scope.causation_id, None)]
            )
        result = c.ScheduleDeleteResult(deleted=deleted)
        await scope.complete(tx, result)
    return result


@dataclass
class _Fired:
    """What one schedule's fire wrote: runs started, fire times skipped, runs cancelled."""

    run_ids: list[str] = field(default_factory=list)
    skipped: int = 0
    cancelled: list[str] = field(default_factory=list)
    events: list[EventBase] = field(default_factory=list)


async def trigger(deps: Deps, cmd: c.ScheduleTrigger, scope: Scope) -> c.ScheduleTriggerResult:
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.ScheduleTriggerResult", cached)
        schedule = await _load(tx, cmd.schedule_id)
        wf = deps.workflow(schedule.workflow_id)
        out = _Fired()
        key = f"schedule:{schedule.id}@trigger:{deps.ids.new_id()}"
        await _fire(deps, tx, schedule, wf, now, key, out, scope.causation_id, now, manual=True)
        if out.run_ids:
            await tx.schedules.update(
                evolve(schedule, {"last_run_id": out.run_ids[-1], "updated_at": now})
            )
        await tx.outbox.append(out.events)
        result = c.ScheduleTriggerResult(
            workflow_run_id=out.run_ids[-1] if out.run_ids else None, skipped=not out.run_ids
        )
        await scope.complete(tx, result)
    _tell_cancelled(deps, out)
    return result


async def fire_due(deps: Deps, cmd: c.ScheduleFireDue, scope: Scope) -> c.ScheduleFireDueResult:
    """Each due schedule fires in a transaction of its own: one whose workflow this
    kernel lacks (a rolling deploy) or whose input no longer validates is logged and left
    due for a kernel that can fire it, without holding up the others."""
    now = deps.clock.now()
    peek = getattr(deps.persistence, "next_schedule_fire_at", None)
    if peek is not None and scope.key is None:
        # An adapter that knows its next fire time without a transaction (the in-memory
        # one): nothing due, nothing opened.
        upcoming = peek()
        if upcoming is None or upcoming > now:
            return c.ScheduleFireDueResult(schedules=0, fired=0, skipped=0, workflow_run_ids=[])
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)  # phased: a keyed fire is marked in progress here
        if cached is not None:
            return cast("c.ScheduleFireDueResult", cached)
        due = await tx.schedules.due(now, cmd.max_schedules)
    run_ids: list[str] = []
    skipped = handled = 0
    for schedule in due:
        try:
            out = await _fire_one(deps, schedule.id, now, scope.causation_id)
        except (ConcurrencyError, DuplicateError):
            continue  # another tick fired it meanwhile
        except Exception as exc:
            deps.logger.warning(
                "schedule.fire_failed",
                schedule_id=schedule.id,
                workflow_id=schedule.workflow_id,
                error=describe_exception(exc),
                message=f"schedule {schedule.id!r} could not fire: {describe_exception(exc)}",
            )
            continue
        if out is None:
            continue
        handled += 1
        run_ids.extend(out.run_ids)
        skipped += out.skipped
        _tell_cancelled(deps, out)
    result = c.ScheduleFireDueResult(
        schedules=handled, fired=len(run_ids), skipped=skipped, workflow_run_ids=run_ids
    )
    if scope.key is not None:
        async with deps.persistence.transaction() as tx:
            await scope.complete(tx, result)
    return result


async def _fire_one(
    deps: Deps, schedule_id: str, now: datetime, causation: str | None
) -> _Fired | None:
    async with deps.persistence.transaction() as tx:
        schedule = await tx.schedules.get(schedule_id, for_update=True)
        if (
            schedule is None
            or schedule.paused
            or schedule.next_fire_at is None
            or schedule.next_fire_at > now
        ):
            return None  # deleted, paused or fired by another tick since it was listed
        wf = deps.workflow(schedule.workflow_id)
        plan = plan_fires(calendar(deps), schedule, now)
        out = _Fired()
        if plan.missed_latest is not None:
            out.skipped += plan.missed_count or 1
            out.events.append(
                ScheduleSkipped(
                    workflow_run_id=stream_id(schedule.id),
                    timestamp=now,
                    causation_id=causation,
                    schedule_id=schedule.id,
                    fire_time=plan.missed_latest,
                    reason="missed",
                    missed_since=plan.missed_since,
                    missed_count=plan.missed_count,
                )
            )
        current = schedule
        for fire_time in plan.fire:
            key = schedule_run_key(schedule.id, fire_time)
            await _fire(deps, tx, current, wf, fire_time, key, out, causation, now)
            if out.run_ids:
                current = evolve(current, {"last_run_id": out.run_ids[-1]})
        await tx.schedules.update(
            evolve(
                current,
                {
                    "next_fire_at": plan.next_fire_at,
                    "last_fire_at": plan.fire[-1] if plan.fire else schedule.last_fire_at,
                    "updated_at": now,
                },
            )
        )
        await tx.outbox.append(out.events)
    return out


async def _fire(
    deps: Deps,
    tx: Transaction,
    schedule: Schedule,
    wf: WorkflowDefinition,
    fire_time: datetime,
    key: str,
    out: _Fired,
    causation: str | None,
    now: datetime,
    *,
    manual: bool = False,
) -> None:
    """Start the run of one fire time under the overlap policy, recording into ``out``."""
    stream = stream_id(schedule.id)
    if schedule.last_run_id is not None and schedule.overlap != "allow":
        previous = await tx.runs.get(schedule.last_run_id, for_update=True)
        if previous is not None and not previous.status.terminal:
            if schedule.overlap == "skip":
                out.skipped += 1
                out.events.append(
                    ScheduleSkipped(
                        workflow_run_id=stream,
                        timestamp=now,
                        causation_id=causation,
                        schedule_id=schedule.id,
                        fire_time=fire_time,
                        reason="overlap",
                        run_id=previous.id,
                    )
                )
                return
            reason = f"schedule {schedule.id!r}: superseded by its run for {fire_time.isoformat()}"
            await cancel_in(deps, tx, previous, reason, causation, now)
            out.cancelled.append(previous.id)
    existing = await tx.runs.find_by_key(wf.id, key)
    if existing is not None:  # a schedule deleted and made again under the same id
        out.run_ids.append(existing.id)
        return
    attributes: dict[str, JsonValue] = {
        SCHEDULE_ATTRIBUTE: schedule.id,
        FIRE_TIME_ATTRIBUTE: fire_time.isoformat(),
    }
    input_json, config_json = validate_run(wf, schedule.input, schedule.config, attributes)
    spec = c.RunCreate(
        workflow_id=wf.id,
        priority=schedule.priority,
        idempotency_key=key,
        search_attributes=attributes,
    )
    run = await start_in(deps, tx, wf, spec, input_json, config_json, causation, now)
    out.run_ids.append(run.id)
    out.events.append(
        ScheduleFired(
            workflow_run_id=stream,
            timestamp=now,
            causation_id=causation,
            schedule_id=schedule.id,
            fire_time=fire_time,
            run_id=run.id,
            workflow_id=wf.id,
            manual=manual,
        )
    )


def _tell_cancelled(deps: Deps, out: _Fired) -> None:
    """Executions of runs a ``cancel_previous`` cancelled see ``ctx.cancelled`` at once."""
    for run_id in out.cancelled:
        deps.inflight.cancel_run(run_id, "superseded by a newer scheduled run")
