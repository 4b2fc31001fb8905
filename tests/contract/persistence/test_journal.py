"""Persistence contract, code workflows (``tx.journal``, ``tx.inbox``, ``tx.timers``): the
reads a code-workflow wake-up makes (issue 11): the
journal from a position on, the entries in one status, the next unconsumed message, the
live timers. Every adapter answers them the same way, through rollbacks too, whatever
order the rows were written in; the SQL adapters serve them from indexes and the memory
adapter from per-run indexes, so none of them walks a run's whole history."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from treadle.kernel.model import Run
from treadle.kernel.workflows.model import InboxMessage, JournalEntry, JournalStatus, Timer
from treadle.tests.contract.persistence.helpers import assert_utc, at, make_run
from treadle.tests.contract.persistence.helpers import seed as seed_runs

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
RUN = "run-1"


class BoomError(Exception):
    """Raised inside a transaction to force its rollback."""


def entry(
    position: int, status: JournalStatus = JournalStatus.COMPLETED, **fields: Any
) -> JournalEntry:
    fields.setdefault("name", f"step-{position}")
    return JournalEntry(
        workflow_run_id=fields.pop("run_id", RUN),
        position=position,
        occurrence=1,
        kind="step",
        status=status,
        created_at=T0,
        **fields,
    )


async def fail_after(backend: Any, writes: Callable[[Any], Awaitable[object]]) -> None:
    """Run ``writes`` in a transaction that then raises ``BoomError``: a rollback."""
    async with backend.persistence.transaction() as tx:
        await writes(tx)
        raise BoomError


async def seed(backend: Any, *entries: JournalEntry) -> list[JournalEntry]:
    async with backend.persistence.transaction() as tx:
        if await tx.runs.get(RUN) is None:
            await tx.runs.insert(Run(id=RUN, workflow_id="wf", created_at=T0, updated_at=T0))
        return [await tx.journal.insert(e) for e in entries]


async def journal(backend: Any, **kwargs: Any) -> list[tuple[int, str]]:
    async with backend.persistence.transaction() as tx:
        return [(e.position, e.status.value) for e in await tx.journal.entries(RUN, **kwargs)]


async def test_journal_from_a_position_is_in_position_order_whatever_the_insert_order(
    backend: Any,
) -> None:
    """``get_journal(from_position=p)``: the entries at ``p`` and after, by position, with
    gaps and out-of-order inserts (branches of ``ctx.all`` commit as they finish)."""
    await seed(backend, entry(0), entry(1), entry(4), entry(2), entry(7), entry(5))
    assert [p for p, _ in await journal(backend, from_position=2)] == [2, 4, 5, 7]
    assert [p for p, _ in await journal(backend, from_position=6)] == [7]
    assert await journal(backend, from_position=8) == []
    assert [p for p, _ in await journal(backend)] == [0, 1, 2, 4, 5, 7]


async def test_journal_by_status_follows_updates_and_rollbacks(backend: Any) -> None:
    """``status=WAITING`` finds the waiting entries as updates move them in and out of
    that status; a rolled-back update or insert leaves the answer as it was."""
    stored = await seed(
        backend,
        entry(0),
        entry(1, JournalStatus.WAITING),
        entry(2, JournalStatus.WAITING),
    )
    async with backend.persistence.transaction() as tx:
        await tx.journal.update(stored[1].model_copy(update={"status": JournalStatus.COMPLETED}))
    assert await journal(backend, status=JournalStatus.WAITING) == [(2, "WAITING")]

    async def finish_and_add(tx: Any) -> None:
        await tx.journal.update(stored[2].model_copy(update={"status": JournalStatus.COMPLETED}))
        await tx.journal.insert(entry(3, JournalStatus.WAITING))

    with pytest.raises(BoomError):
        await fail_after(backend, finish_and_add)
    assert await journal(backend, status=JournalStatus.WAITING) == [(2, "WAITING")]
    assert await journal(backend, from_position=2) == [(2, "WAITING")]
    assert await journal(backend, status=JournalStatus.WAITING, from_position=3) == []
    assert await journal(backend, status=JournalStatus.COMPLETED, from_position=1) == [
        (1, "COMPLETED")
    ]


def message(name: str, seconds: int, *, consumed: bool = False) -> InboxMessage:
    at = T0 + timedelta(seconds=seconds)
    return InboxMessage(
        workflow_run_id=RUN,
        name=name,
        payload=seconds,
        created_at=at,
        consumed_at=at if consumed else None,
        consumed_by="copied#1" if consumed else None,
    )


async def next_payload(backend: Any, name: str, kind: str = "signal") -> Any:
    async with backend.persistence.transaction() as tx:
        found = await tx.inbox.next_message(RUN, name, kind=kind)
    return None if found is None else found.payload


async def test_next_signal_is_the_oldest_unconsumed_through_consumes_and_rollbacks(
    backend: Any,
) -> None:
    """``next_signal`` skips consumed messages (also those stored consumed, as a fork
    copies them) and other names; a rolled-back consume leaves the message next."""
    await seed(backend)
    async with backend.persistence.transaction() as tx:
        first = await tx.inbox.insert(message("tick", 1))
        await tx.inbox.insert(message("tick", 0, consumed=True))
        await tx.inbox.insert(message("other", 2))
        await tx.inbox.insert(message("tick", 3))
    assert await next_payload(backend, "tick") == 1
    assert await next_payload(backend, "tick", kind="update") is None

    async def consume(tx: Any) -> None:
        await tx.inbox.consume(first.id, T0, "signal:tick#1")
        found = await tx.inbox.next_message(RUN, "tick")
        assert found is not None
        assert found.payload == 3

    with pytest.raises(BoomError):
        await fail_after(backend, consume)
    assert await next_payload(backend, "tick") == 1
    async with backend.persistence.transaction() as tx:
        await tx.inbox.consume(first.id, T0, "signal:tick#1")
    assert await next_payload(backend, "tick") == 3
    assert await next_payload(backend, "other") == 2


async def test_pending_timers_are_the_run_s_unfired_ones(backend: Any) -> None:
    """``pending_timers`` lists the run's live timers only: a fired one leaves it (unless
    the rollback of the firing), a rescheduled one comes back, other runs' never show."""

    def timer(name: str, minutes: int, run_id: str = RUN) -> Timer:
        return Timer(
            workflow_run_id=run_id,
            name=name,
            occurrence=1,
            purpose="sleep",
            fire_at=T0 + timedelta(minutes=minutes),
            created_at=T0,
        )

    async def pending() -> list[str]:
        async with backend.persistence.transaction() as tx:
            return [t.name for t in await tx.timers.pending(RUN)]

    await seed(backend)
    async with backend.persistence.transaction() as tx:
        await tx.timers.schedule(timer("b", 2))
        await tx.timers.schedule(timer("a", 1))
        await tx.timers.schedule(timer("x", 0, run_id="run-2"))
    assert await pending() == ["a", "b"]
    async with backend.persistence.transaction() as tx:
        assert await tx.timers.fire(RUN, "a", 1, T0)
    assert await pending() == ["b"]

    async def fire(tx: Any) -> None:
        assert await tx.timers.fire(RUN, "b", 1, T0)

    with pytest.raises(BoomError):
        await fail_after(backend, fire)
    assert await pending() == ["b"]
    async with backend.persistence.transaction() as tx:
        await tx.timers.schedule(timer("a", 3))  # a retry scheduled again under its key
    assert await pending() == ["b", "a"]


async def test_due_timers_of_one_purpose_across_runs(backend: Any) -> None:
    """Unfired timers of the asked purpose due at ``now`` come back across runs, earliest
    first and up to ``limit``; a fired timer or another purpose is never due."""
    from treadle.kernel.workflows.model import Timer

    await seed_runs(backend, make_run("r1"), make_run("r2"))

    def timer(run_id: str, name: str, seconds: float, purpose: str) -> Timer:
        return Timer(
            workflow_run_id=run_id,
            name=name,
            occurrence=0,
            purpose=purpose,
            fire_at=at(seconds),
            created_at=T0,
        )

    async with backend.persistence.transaction() as tx:
        await tx.timers.schedule(timer("r1", "deadline", 10, "execution_timeout"))
        await tx.timers.schedule(timer("r2", "deadline", 5, "execution_timeout"))
        await tx.timers.schedule(timer("r2", "later", 50, "execution_timeout"))
        await tx.timers.schedule(timer("r1", "nap", 1, "sleep"))
    async with backend.persistence.transaction() as tx:
        due = await tx.timers.due(at(10), 10, purpose="execution_timeout")
        first = await tx.timers.due(at(10), 1, purpose="execution_timeout")
        assert await tx.timers.fire("r2", "deadline", 0, at(11))
    assert [(t.workflow_run_id, t.name, t.fire_at) for t in due] == [
        ("r2", "deadline", at(5)),
        ("r1", "deadline", at(10)),
    ]
    assert [t.workflow_run_id for t in first] == ["r2"]
    assert_utc(due[0].fire_at)
    async with backend.persistence.transaction() as tx:
        after = await tx.timers.due(at(100), 10, purpose="execution_timeout")
    assert [(t.workflow_run_id, t.name) for t in after] == [("r1", "deadline"), ("r2", "later")]
