"""Helpers of the persistence contract suite (one file per concern, every backend:
memory, SQLite file, PostgreSQL; the ``backend`` fixture is in ``tests/contract/conftest.py``).

Time is passed in explicitly (no sleeps); every timestamp carries microseconds so a
round trip that truncates or drops the timezone is caught.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from treadle.kernel.events import WorkflowCreated
from treadle.kernel.model import Annotation, Run, StageRun

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/flows.py", line 12, in extract\n'
    "    return parse(ctx.input.url)\n"
    "ZeroDivisionError: division by zero — über\n"
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_run(run_id: str, **fields: Any) -> Run:
    fields.setdefault("workflow_id", "wf")
    fields.setdefault("created_at", T0)
    fields.setdefault("updated_at", fields["created_at"])
    return Run(id=run_id, **fields)


def make_stage(run_id: str, stage_id: str, group: int = 0, **fields: Any) -> StageRun:
    return StageRun(workflow_run_id=run_id, stage_id=stage_id, execution_group=group, **fields)


def created(run_id: str, seconds: float = 0) -> WorkflowCreated:
    return WorkflowCreated(
        workflow_run_id=run_id, timestamp=at(seconds), workflow_id="wf", priority=5
    )


def assert_utc(moment: datetime | None) -> None:
    assert moment is not None
    assert moment.tzinfo is not None
    assert moment.utcoffset() == timedelta(0)


class BoomError(Exception):
    """Raised inside a transaction to force its rollback."""


async def fail_after(backend: Any, writes: Callable[[Any], Awaitable[object]]) -> None:
    """Run ``writes`` in a transaction that then raises ``BoomError``, forcing a rollback."""
    async with backend.persistence.transaction() as tx:
        await writes(tx)
        raise BoomError


async def seed(backend: Any, *runs: Run, stages: tuple[StageRun, ...] = ()) -> None:
    async with backend.persistence.transaction() as tx:
        for run in runs:
            await tx.runs.insert(run)
        if stages:
            await tx.stages.insert_many(list(stages))


def annotation(ann_id: str, run_id: str = "r1", **fields: Any) -> Annotation:
    fields.setdefault("attributes", {})
    return Annotation(id=ann_id, workflow_run_id=run_id, created_at=at(len(ann_id)), **fields)
