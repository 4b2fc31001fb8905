"""Retention contract (``tx.retention``, ports/retention.py): every adapter selects the
same expired runs and deletes a terminal run with every row stored for it, in its
transaction (a rollback restores all), and never deletes a run that is not terminal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from treadle.kernel.ai import AICall
from treadle.kernel.events import SignalReceived, WorkflowCreated
from treadle.kernel.model import (
    Annotation,
    IdempotencyRecord,
    IdempotencyState,
    Job,
    LogRecord,
    Run,
    RunStatus,
    StageRun,
)
from treadle.kernel.workflows.model import InboxMessage, JournalEntry, JournalStatus, Timer

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
TERMINAL = frozenset(s for s in RunStatus if s.terminal)


class BoomError(Exception):
    """Raised inside a transaction to force its rollback."""


def run(run_id: str, status: RunStatus, *, ended: int = 0, workflow_id: str = "wf") -> Run:
    at = T0 + timedelta(days=ended)
    return Run(
        id=run_id,
        workflow_id=workflow_id,
        status=status,
        idempotency_key=f"key-{run_id}",
        created_at=T0,
        updated_at=at,
        completed_at=at if status.terminal else None,
    )


async def seed(backend: Any, item: Run) -> None:
    """The run with a row in every table that holds per-run rows."""
    run_id = item.id
    async with backend.persistence.transaction() as tx:
        await tx.runs.insert(item)
        await tx.stages.insert_many(
            [StageRun(workflow_run_id=run_id, stage_id="s", execution_group=0)]
        )
        await backend.job_transport.enqueue(
            tx,
            [
                Job(
                    id=f"job-{run_id}",
                    workflow_run_id=run_id,
                    workflow_id=item.workflow_id,
                    stage_id="s",
                    next_poll_at=T0,
                    enqueued_at=T0,
                )
            ],
        )
        if item.status.terminal:
            await backend.job_transport.complete(tx, f"job-{run_id}")
        await tx.outbox.append(
            [
                WorkflowCreated(workflow_run_id=run_id, timestamp=T0, workflow_id="wf", priority=5),
                SignalReceived(workflow_run_id=run_id, timestamp=T0, name="go"),
            ]
        )
        await tx.logs.append(
            [
                LogRecord(
                    workflow_run_id=run_id, stage_id="s", level="info", message="hi", timestamp=T0
                )
            ]
        )
        await tx.annotations.insert_many(
            [
                Annotation(
                    id=f"a-{run_id}", workflow_run_id=run_id, attributes={"k": 1}, created_at=T0
                )
            ]
        )
        await tx.journal.insert(
            JournalEntry(
                workflow_run_id=run_id,
                position=0,
                name="step",
                occurrence=1,
                kind="step",
                created_at=T0,
                status=JournalStatus.WAITING,
                idempotency_key=f"j-{run_id}",
            )
        )
        await tx.inbox.insert(
            InboxMessage(
                workflow_run_id=run_id, name="go", payload=1, created_at=T0, idempotency_key="sig"
            )
        )
        await tx.timers.schedule(
            Timer(
                workflow_run_id=run_id,
                name="nap",
                occurrence=1,
                purpose="sleep",
                fire_at=T0,
                created_at=T0,
            )
        )
        await tx.ai_calls.record(
            [
                AICall(
                    workflow_run_id=run_id,
                    workflow_id="wf",
                    model="m",
                    prompt="p" * 64,
                    cost=Decimal("0.01"),
                    created_at=T0,
                )
            ]
        )
        await tx.ai_calls.set_budget(run_id, Decimal("1"))
        await tx.idempotency.put(
            IdempotencyRecord(
                key=f"job:{run_id}:1",
                command_type="job.execute",
                state=IdempotencyState.COMPLETED,
                result={"outcome": "completed", "workflow_run_id": run_id},
                started_at=T0,
            )
        )


async def purge(tx: Any, backend: Any, run_ids: list[str]) -> list[str]:
    """As ``run.purge`` does: ``tx.retention.purge_runs``, then the job transport's
    ``forget_runs`` where it keeps jobs outside the persistence (``JobRetention``)."""
    deleted: list[str] = await tx.retention.purge_runs(run_ids)
    forget = getattr(backend.job_transport, "forget_runs", None)
    if forget is not None:
        await forget(tx, deleted)
    return deleted


async def stored(backend: Any, run_id: str) -> dict[str, Any]:
    """What every read of the run finds (empty or ``None`` once it is purged)."""
    async with backend.persistence.transaction() as tx:
        return {
            "run": await tx.runs.get(run_id),
            "by_key": await tx.runs.find_by_key("wf", f"key-{run_id}"),
            "stages": await tx.stages.for_run(run_id),
            "job": await backend.job_transport.get(tx, f"job-{run_id}"),
            "events": await tx.outbox.events_for_run(run_id),
            "logs": await tx.logs.for_run(run_id),
            "annotations": await tx.annotations.for_run(run_id),
            "journal": await tx.journal.entries(run_id),
            "signals": await tx.inbox.for_run(run_id),
            "next_signal": await tx.inbox.next_message(run_id, "go"),
            "timers": await tx.timers.pending(run_id),
            "idempotency": await tx.idempotency.get(f"job:{run_id}:1", "job.execute"),
            "ai_calls": await tx.ai_calls.for_run(run_id),
            "ai_totals": await tx.ai_calls.totals([run_id]),
        }


def gone(found: dict[str, Any]) -> bool:
    return not any(found.values())


def whole(found: dict[str, Any]) -> bool:
    return all(value not in (None, [], {}) for value in found.values())


async def test_purge_deletes_every_row_of_a_terminal_run_and_nothing_else(backend: Any) -> None:
    """A purged terminal run leaves nothing behind in any table; the run beside it, in
    every status including the terminal ones not asked for, keeps every row."""
    for status in RunStatus:
        await seed(backend, run(f"keep-{status.value}", status))
    await seed(backend, run("old", RunStatus.COMPLETED))
    async with backend.persistence.transaction() as tx:
        assert await purge(tx, backend, ["old"]) == ["old"]
    assert gone(await stored(backend, "old"))
    for status in RunStatus:
        assert whole(await stored(backend, f"keep-{status.value}")), status
    async with backend.persistence.transaction() as tx:  # its events are numbered afresh
        appended = await tx.outbox.append(
            [WorkflowCreated(workflow_run_id="old", timestamp=T0, workflow_id="wf", priority=5)]
        )
    assert appended[0].sequence == 1


async def test_purge_refuses_every_run_that_is_not_terminal(backend: Any) -> None:
    """Asked to purge runs in every status, storage deletes only the terminal ones."""
    for status in RunStatus:
        await seed(backend, run(status.value, status))
    async with backend.persistence.transaction() as tx:
        deleted = await purge(tx, backend, [s.value for s in RunStatus])
    assert sorted(deleted) == sorted(s.value for s in TERMINAL)
    for status in RunStatus:
        found = await stored(backend, status.value)
        assert gone(found) if status.terminal else whole(found), status


async def test_a_rolled_back_purge_restores_everything(backend: Any) -> None:
    """The purge is part of its transaction: a rollback leaves every row as it was."""
    await seed(backend, run("old", RunStatus.FAILED))
    before = await stored(backend, "old")

    async def purge_then_fail() -> None:
        async with backend.persistence.transaction() as tx:
            await purge(tx, backend, ["old"])
            raise BoomError

    with pytest.raises(BoomError):
        await purge_then_fail()
    assert await stored(backend, "old") == before


async def test_expired_runs_by_workflow_cutoff_and_default(backend: Any) -> None:
    """Selection: terminal runs in the given statuses that ended before their workflow's
    cutoff (or the default one), oldest first, at most ``limit``; never a live run."""
    await seed(backend, run("a-old", RunStatus.COMPLETED, ended=1, workflow_id="a"))
    await seed(backend, run("a-new", RunStatus.COMPLETED, ended=20, workflow_id="a"))
    await seed(backend, run("b-old", RunStatus.FAILED, ended=2, workflow_id="b"))
    await seed(backend, run("c-older", RunStatus.CANCELLED, ended=0, workflow_id="c"))
    await seed(backend, run("c-live", RunStatus.RUNNING, ended=0, workflow_id="c"))
    cut = T0 + timedelta(days=10)

    async def expired(**kwargs: Any) -> list[str]:
        kwargs.setdefault("statuses", TERMINAL)
        kwargs.setdefault("limit", 10)
        async with backend.persistence.transaction() as tx:
            return await tx.retention.expired_runs(**kwargs)

    assert await expired(cutoffs={"a": cut}, default_cutoff=None) == ["a-old"]
    assert await expired(cutoffs={"a": cut}, default_cutoff=cut) == ["c-older", "a-old", "b-old"]
    assert await expired(cutoffs={"a": T0}, default_cutoff=cut) == ["c-older", "b-old"]
    assert await expired(cutoffs={}, default_cutoff=cut, limit=2) == ["c-older", "a-old"]
    assert await expired(
        cutoffs={}, default_cutoff=cut, statuses=frozenset({RunStatus.FAILED, RunStatus.RUNNING})
    ) == ["b-old"]
    assert await expired(cutoffs={}, default_cutoff=None) == []
