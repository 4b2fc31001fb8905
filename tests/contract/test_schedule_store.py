"""ScheduleStore contract (``tx.schedules``), the same assertions on every adapter:
insert and read back, optimistic update, delete, listing filters, the due query, the
earliest fire time, and rollback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from treadle.kernel.errors import ConcurrencyError, DuplicateError
from treadle.kernel.schedules import Schedule
from treadle.tests.contract.conftest import Backend

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _schedule(
    sid: str, *, minutes: int | None = 5, paused: bool = False, wf: str = "wf"
) -> Schedule:
    return Schedule(
        id=sid,
        workflow_id=wf,
        cron="*/5 * * * *",
        timezone="Europe/Paris",
        input={"region": "emea", "n": [1, 2]},
        misfire_grace=timedelta(seconds=90),
        overlap="skip",
        paused=paused,
        next_fire_at=None if minutes is None else T0 + timedelta(minutes=minutes),
        created_at=T0,
        updated_at=T0,
    )


async def _insert(backend: Backend, schedule: Schedule) -> None:
    async with backend.persistence.transaction() as tx:
        await tx.schedules.insert(schedule)


async def test_insert_get_update_delete(backend: Backend) -> None:
    """A schedule reads back equal; an update needs the stored version and bumps it; a
    duplicate id and a stale update are refused; delete says whether there was one."""
    first = _schedule("a")
    async with backend.persistence.transaction() as tx:
        await tx.schedules.insert(first)
    async with backend.persistence.transaction() as tx:
        assert await tx.schedules.get("a", for_update=True) == first
        assert await tx.schedules.get("missing") is None
    with pytest.raises(DuplicateError):
        await _insert(backend, _schedule("a"))
    async with backend.persistence.transaction() as tx:
        moved = await tx.schedules.update(first.model_copy(update={"paused": True}))
    assert moved.version == first.version + 1
    async with backend.persistence.transaction() as tx:
        assert await tx.schedules.get("a") == moved
        with pytest.raises(ConcurrencyError):
            await tx.schedules.update(first)
    async with backend.persistence.transaction() as tx:
        assert await tx.schedules.delete("a") is True
        assert await tx.schedules.delete("a") is False


async def test_list_due_and_next_fire_at(backend: Backend) -> None:
    """``due`` returns unpaused schedules at or before now, earliest first; ``list``
    filters by workflow and pause; ``next_fire_at`` ignores paused schedules."""
    async with backend.persistence.transaction() as tx:
        for schedule in (
            _schedule("late", minutes=10),
            _schedule("early", minutes=5, wf="other"),
            _schedule("paused", minutes=1, paused=True),
            _schedule("never", minutes=None),
            _schedule("future", minutes=60),
        ):
            await tx.schedules.insert(schedule)
    async with backend.persistence.transaction() as tx:
        due = await tx.schedules.due(T0 + timedelta(minutes=10), 10)
        assert [s.id for s in due] == ["early", "late"]
        assert [s.id for s in await tx.schedules.due(T0 + timedelta(minutes=10), 1)] == ["early"]
        assert await tx.schedules.next_fire_at() == T0 + timedelta(minutes=5)
        everything = await tx.schedules.list()
        assert [s.id for s in everything] == sorted(s.id for s in everything)
        assert [s.id for s in await tx.schedules.list(workflow_id="other")] == ["early"]
        assert [s.id for s in await tx.schedules.list(paused=True)] == ["paused"]


async def test_a_rolled_back_write_leaves_nothing(backend: Backend) -> None:
    """Insert and update inside a transaction that raises are both undone."""
    async with backend.persistence.transaction() as tx:
        await tx.schedules.insert(_schedule("kept"))

    async def write_then_fail() -> None:
        async with backend.persistence.transaction() as tx:
            kept = await tx.schedules.get("kept")
            assert kept is not None
            await tx.schedules.update(kept.model_copy(update={"cron": "0 * * * *"}))
            await tx.schedules.insert(_schedule("gone"))
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await write_then_fail()
    async with backend.persistence.transaction() as tx:
        assert await tx.schedules.get("gone") is None
        stored = await tx.schedules.get("kept")
        assert stored is not None
        assert stored.cron == "*/5 * * * *"
