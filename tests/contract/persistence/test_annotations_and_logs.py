"""Persistence contract, annotations and logs (``tx.annotations``, ``tx.logs``)."""

from __future__ import annotations

from typing import Any

import pytest

from treadle.kernel.errors import (
    DuplicateError,
)
from treadle.kernel.model import (
    LogRecord,
)
from treadle.tests.contract.persistence.helpers import annotation, assert_utc, at


async def test_logs_append_and_read_in_order(backend: Any) -> None:
    """Logs come back per run in append order, fields and timestamps intact."""
    logs = [
        LogRecord(
            workflow_run_id="r1",
            stage_id="s",
            level="info",
            message="one",
            fields={"n": 1, "tags": ["a"]},
            timestamp=at(1.000001),
        ),
        LogRecord(
            workflow_run_id="r2", stage_id=None, level="warning", message="x", timestamp=at(2)
        ),
        LogRecord(
            workflow_run_id="r1", stage_id=None, level="error", message="two", timestamp=at(0)
        ),
    ]
    async with backend.persistence.transaction() as tx:
        await tx.logs.append(logs[:2])
        await tx.logs.append([])
    async with backend.persistence.transaction() as tx:
        await tx.logs.append(logs[2:])
    async with backend.persistence.transaction() as tx:
        r1 = await tx.logs.for_run("r1")
        assert await tx.logs.for_run("r2") == [logs[1]]
        assert await tx.logs.for_run("none") == []
    assert r1 == [logs[0], logs[2]]
    assert_utc(r1[0].timestamp)


async def test_annotations_round_trip_and_list_filters(backend: Any) -> None:
    """Annotations list in insertion order, narrowed by key, key prefix, scope and limit."""
    items = [
        annotation("a1", attributes={"env.region": "eu", "owner": "x"}, scope="deploy", actor="ci"),
        annotation("a2", attributes={"Env.Upper": 1}, scope="review", stage_id="s"),
        annotation("a3", attributes={"owner": "y"}, idempotency_key="once"),
        annotation("a4", attributes={"env.zone": "b"}, scope="deploy"),
        annotation("b1", run_id="r2", attributes={"owner": "z"}),
    ]
    async with backend.persistence.transaction() as tx:
        await tx.annotations.insert_many(items[:2])
        await tx.annotations.insert_many([])
    async with backend.persistence.transaction() as tx:
        await tx.annotations.insert_many(items[2:])

    async def ids(**kw: Any) -> list[str]:
        async with backend.persistence.transaction() as tx:
            return [a.id for a in await tx.annotations.for_run("r1", **kw)]

    async with backend.persistence.transaction() as tx:
        assert await tx.annotations.for_run("r1") == items[:4]
        assert await tx.annotations.find("r1", "once") == items[2]
        assert await tx.annotations.find("r2", "once") is None
    assert await ids(key="owner") == ["a1", "a3"]
    assert await ids(key_prefix="env.") == ["a1", "a4"]
    assert await ids(key_prefix="Env.") == ["a2"]
    assert await ids(scope="deploy") == ["a1", "a4"]
    assert await ids(scope="deploy", key="owner") == ["a1"]
    assert await ids(limit=2) == ["a1", "a2"]
    assert await ids(key="owner", limit=1) == ["a1"]
    assert await ids(key="nope") == []


async def test_annotation_idempotency_key_is_unique_per_run(backend: Any) -> None:
    """A second annotation with a used key on the same run raises ``DuplicateError``; another
    run may use the key."""
    async with backend.persistence.transaction() as tx:
        await tx.annotations.insert_many([annotation("a1", idempotency_key="k")])
    with pytest.raises(DuplicateError, match="'k'"):
        async with backend.persistence.transaction() as tx:
            await tx.annotations.insert_many([annotation("a2", idempotency_key="k")])
    async with backend.persistence.transaction() as tx:
        await tx.annotations.insert_many([annotation("b1", run_id="r2", idempotency_key="k")])
        assert [a.id for a in await tx.annotations.for_run("r1")] == ["a1"]
