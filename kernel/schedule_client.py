"""``kernel.schedules`` (``engine.schedules``): manage cron schedules by name.

Thin: each change is a ``schedule.*`` command, each read a transaction on
``tx.schedules``; the CLI, ``Engine`` and ``TestEngine`` all come through here.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import treadle.kernel.commands as c
from treadle.kernel.errors import ScheduleNotFoundError
from treadle.kernel.schedules import (
    DEFAULT_MAX_CATCHUP,
    DEFAULT_MISFIRE_GRACE,
    CatchupPolicy,
    OverlapPolicy,
    Schedule,
    ScheduleDefinition,
)

if TYPE_CHECKING:
    from treadle.ports import Persistence

Dispatch = Callable[[Any], Awaitable[c.ResultBase]]


class Schedules:
    """Create, change, pause, resume, delete, trigger and read schedules."""

    def __init__(
        self,
        dispatch: Dispatch,
        persistence: Persistence,
        *,
        on_due: Callable[[datetime], None] | None = None,
    ) -> None:
        self._dispatch = dispatch
        self._persistence = persistence
        self._on_due = on_due
        """Told each next fire time a change here sets: an ``Engine`` wakes its in-process
        workers with it (the SQL adapters also tell them on commit; memory does not)."""

    def _told(self, schedule: Schedule) -> Schedule:
        if self._on_due is not None and not schedule.paused and schedule.next_fire_at:
            self._on_due(schedule.next_fire_at)
        return schedule

    async def create(
        self,
        schedule_id: str,
        workflow_id: str,
        *,
        cron: str,
        input: Any = None,
        timezone: str = "UTC",
        config: dict[str, Any] | None = None,
        priority: int = 5,
        catchup: CatchupPolicy = "latest",
        max_catchup: int = DEFAULT_MAX_CATCHUP,
        misfire_grace: timedelta | float = DEFAULT_MISFIRE_GRACE,
        overlap: OverlapPolicy = "allow",
        paused: bool = False,
    ) -> Schedule:
        """A new schedule (``DuplicateError`` if the id exists); it first fires at the
        first fire time after now."""
        result = await self._dispatch(
            {
                "type": "schedule.create",
                "schedule_id": schedule_id,
                "workflow_id": workflow_id,
                "cron": cron,
                "input": _plain(input),
                "timezone": timezone,
                "config": {k: _plain(v) for k, v in (config or {}).items()},
                "priority": priority,
                "catchup": catchup,
                "max_catchup": max_catchup,
                "misfire_grace": misfire_grace,
                "overlap": overlap,
                "paused": paused,
            }
        )
        assert isinstance(result, c.ScheduleCreateResult)
        return self._told(result.schedule)

    async def update(self, schedule_id: str, **changes: Any) -> Schedule:
        """Change the given fields (``cron``, ``timezone``, ``input``, ``config``,
        ``priority``, ``catchup``, ``max_catchup``, ``misfire_grace``, ``overlap``)."""
        if "input" in changes:
            changes["input"] = _plain(changes["input"])
        result = await self._dispatch(
            {"type": "schedule.update", "schedule_id": schedule_id, **changes}
        )
        assert isinstance(result, c.ScheduleUpdateResult)
        return self._told(result.schedule)

    async def pause(self, schedule_id: str) -> Schedule:
        """Stop firing until ``resume``; a trigger still starts a run."""
        return await self.update(schedule_id, paused=True)

    async def resume(self, schedule_id: str) -> Schedule:
        """Fire again from the first fire time after now (none missed while paused)."""
        return await self.update(schedule_id, paused=False)

    async def delete(self, schedule_id: str) -> bool:
        """Remove it (its runs stay); ``False`` if there was none."""
        result = await self._dispatch(c.ScheduleDelete(schedule_id=schedule_id))
        assert isinstance(result, c.ScheduleDeleteResult)
        return result.deleted

    async def trigger(self, schedule_id: str, *, idempotency_key: str | None = None) -> str | None:
        """Start a run now; its id, or ``None`` when the overlap policy skipped it."""
        result = await self._dispatch(
            c.ScheduleTrigger(schedule_id=schedule_id, idempotency_key=idempotency_key)
        )
        assert isinstance(result, c.ScheduleTriggerResult)
        return result.workflow_run_id

    async def get(self, schedule_id: str) -> Schedule:
        """The schedule; ``ScheduleNotFoundError`` if there is none."""
        async with self._persistence.transaction() as tx:
            found = await tx.schedules.get(schedule_id)
        if found is None:
            raise ScheduleNotFoundError(f"no schedule with id {schedule_id!r}")
        return found

    async def list(
        self, *, workflow_id: str | None = None, paused: bool | None = None, limit: int = 1000
    ) -> builtins.list[Schedule]:
        """Schedules by id, optionally of one workflow or only (un)paused ones."""
        async with self._persistence.transaction() as tx:
            return await tx.schedules.list(workflow_id=workflow_id, paused=paused, limit=limit)

    async def sync(self, definitions: Iterable[ScheduleDefinition]) -> builtins.list[Schedule]:
        """Create each declared schedule, or bring an existing one's spec in line with
        the code (keeping whether it is paused): what an engine does when it opens."""
        out: list[Schedule] = []
        for definition in definitions:
            spec = definition.spec.model_dump()
            result = await self._dispatch(
                c.ScheduleCreate(
                    schedule_id=definition.id, declared=True, if_exists="update", **spec
                )
            )
            assert isinstance(result, c.ScheduleCreateResult)
            out.append(self._told(result.schedule))
        return out


def _plain(value: Any) -> Any:
    """A pydantic model given as input, as the JSON a command carries."""
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else value


def declared_schedules(workflows: Iterable[Any]) -> list[ScheduleDefinition]:
    """The schedules that workflow definitions declare (``@workflow(schedule=...)``,
    ``WorkflowBuilder(schedule=...)``)."""
    out: list[ScheduleDefinition] = []
    for wf in workflows:
        out.extend(getattr(wf, "schedules", ()))
    return out
