"""Persistence contract, idempotency records (``tx.idempotency``)."""

from __future__ import annotations

from typing import Any

from treadle.kernel.model import (
    IdempotencyRecord,
    IdempotencyState,
)
from treadle.tests.contract.persistence.helpers import T0, assert_utc, at


async def test_idempotency_records_put_get_replace_delete(backend: Any) -> None:
    """Records are keyed by (key, command type); put replaces, delete removes (idempotently)."""
    started = IdempotencyRecord(
        key="k", command_type="run.create", state=IdempotencyState.IN_PROGRESS, started_at=at(1)
    )
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put(started)
        assert await tx.idempotency.get("k", "run.create") == started
    done = started.model_copy(
        update={
            "state": IdempotencyState.COMPLETED,
            "result": {"workflow_run_id": "r1", "nested": [1, {"a": None}]},
            "started_at": at(2),
        }
    )
    other = started.model_copy(update={"command_type": "run.cancel"})
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put(done)
        await tx.idempotency.put(other)
    async with backend.persistence.transaction() as tx:
        got = await tx.idempotency.get("k", "run.create")
        assert got == done
        assert_utc(got.started_at if got else None)
        assert await tx.idempotency.get("k", "run.cancel") == other
        assert await tx.idempotency.get("k", "run.transition") is None
        await tx.idempotency.delete("k", "run.create")
        await tx.idempotency.delete("k", "never-there")
    async with backend.persistence.transaction() as tx:
        assert await tx.idempotency.get("k", "run.create") is None
        assert await tx.idempotency.get("k", "run.cancel") == other


async def test_put_idempotency_many_upserts_every_record(backend: Any) -> None:
    """As ``put_idempotency`` for each record in order: new keys inserted, existing ones
    replaced, and a key given twice keeps its last record."""
    base = IdempotencyRecord(
        key="k1", command_type="job.execute", state=IdempotencyState.IN_PROGRESS, started_at=T0
    )
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put(base)
    done = base.model_copy(
        update={"state": IdempotencyState.COMPLETED, "result": {"r": [1]}, "started_at": at(1)}
    )
    other = base.model_copy(update={"key": "k2", "result": "x"})
    first = base.model_copy(update={"key": "k3"})
    last = first.model_copy(update={"state": IdempotencyState.COMPLETED, "result": 3})
    async with backend.persistence.transaction() as tx:
        await tx.idempotency.put_many([done, other, first, last])
        await tx.idempotency.put_many([])
    async with backend.persistence.transaction() as tx:
        got = [await tx.idempotency.get(k, "job.execute") for k in ("k1", "k2", "k3")]
    assert got == [done, other, last]
