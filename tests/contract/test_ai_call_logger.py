"""AICallLogger contract (``tx.ai_calls``), the same assertions on every adapter: calls
read back in order with ids, totals add up exactly (failed attempts counted and marked),
budgets, aggregation by workflow, model, day and run, rollback, and retention's purge."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from treadle.kernel.ai import AICall
from treadle.tests.contract.conftest import Backend

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


def _call(run: str, model: str = "gpt-4o", *, cost: str | None = "0.0012", **kw: object) -> AICall:
    values: dict[str, object] = {
        "workflow_run_id": run,
        "workflow_id": "wf",
        "stage_id": "summarise",
        "attempt": 1,
        "call_type": "text",
        "provider": "openai",
        "model": model,
        "prompt": [{"role": "user", "content": "hello"}],
        "response": "hi there",
        "input_tokens": 10,
        "output_tokens": 5,
        "cost": None if cost is None else Decimal(cost),
        "latency": timedelta(milliseconds=850),
        "created_at": T0,
    }
    values.update(kw)
    return AICall.model_validate(values)


async def test_calls_read_back_in_order_with_totals(backend: Backend) -> None:
    """Recorded calls come back equal, in recording order, with increasing ids; the run's
    totals are their exact sums, with the failed attempt's call counted and marked."""
    calls = [
        _call("r1", cost="0.000123456", failed_attempt=True, error="boom", response=None),
        _call("r1", cost="0.25", attempt=2, topic="summary"),
        _call("r1", model="claude", cost=None, call_type="object", step="ask#1", stage_id=None),
        _call("r2", cost="1.5"),
    ]
    async with backend.persistence.transaction() as tx:
        stored = await tx.ai_calls.record(calls)
    assert [c.id for c in stored] == sorted(c.id for c in stored)
    assert all(c.id is not None for c in stored)
    async with backend.persistence.transaction() as tx:
        back = await tx.ai_calls.for_run("r1")
        totals = await tx.ai_calls.totals(["r1", "r2", "nobody"])
    assert back == stored[:3]
    assert back[0].prompt == [{"role": "user", "content": "hello"}]
    assert back[0].failed_attempt
    assert back[0].error == "boom"
    assert set(totals) == {"r1", "r2"}
    r1 = totals["r1"]
    assert r1.total_cost == Decimal("0.250123456")
    assert (r1.calls, r1.failed_calls, r1.total_tokens) == (3, 1, 45)
    assert (r1.input_tokens, r1.output_tokens, r1.max_cost) == (30, 15, None)
    assert totals["r2"].total_cost == Decimal("1.5")


async def test_rollback_leaves_no_call_and_no_cost(backend: Backend) -> None:
    """A rolled-back transaction leaves neither the calls nor their cost in the totals."""
    async with backend.persistence.transaction() as tx:
        await tx.ai_calls.record([_call("r1", cost="1")])

    async def rolled_back() -> None:
        async with backend.persistence.transaction() as tx:
            await tx.ai_calls.record([_call("r1", cost="2")])
            await tx.ai_calls.set_budget("r1", Decimal("5"))
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await rolled_back()
    async with backend.persistence.transaction() as tx:
        assert len(await tx.ai_calls.for_run("r1")) == 1
        totals = (await tx.ai_calls.totals(["r1"]))["r1"]
    assert (totals.total_cost, totals.calls, totals.max_cost) == (Decimal(1), 1, None)


async def test_budget_is_kept_apart_from_the_totals(backend: Backend) -> None:
    """A budget set before any call reads back with zero totals; calls keep it."""
    async with backend.persistence.transaction() as tx:
        await tx.ai_calls.set_budget("r1", Decimal("0.50"))
    async with backend.persistence.transaction() as tx:
        before = (await tx.ai_calls.totals(["r1"]))["r1"]
        await tx.ai_calls.record([_call("r1", cost="0.2")])
    async with backend.persistence.transaction() as tx:
        after = (await tx.ai_calls.totals(["r1"]))["r1"]
    assert (before.max_cost, before.calls, before.total_cost) == (Decimal("0.5"), 0, 0)
    assert (after.max_cost, after.calls, after.total_cost) == (Decimal("0.5"), 1, Decimal("0.2"))


async def test_aggregate_by_workflow_model_day_and_run(backend: Backend) -> None:
    """Aggregates group by workflow, model, UTC day or run, most expensive first, and
    honour the time window and workflow filter."""
    day2 = T0 + timedelta(days=1)
    async with backend.persistence.transaction() as tx:
        await tx.ai_calls.record(
            [
                _call("r1", cost="0.10"),
                _call("r1", model="claude", cost="0.30", failed_attempt=True),
                _call("r2", cost="0.05", workflow_id="other", created_at=day2),
            ]
        )
    async with backend.persistence.transaction() as tx:
        by_model = await tx.ai_calls.aggregate("model")
        by_workflow = await tx.ai_calls.aggregate("workflow")
        by_day = await tx.ai_calls.aggregate("day")
        by_run = await tx.ai_calls.aggregate("run", workflow_id="wf")
        later = await tx.ai_calls.aggregate("model", since=T0 + timedelta(hours=1))
    assert [(r.key, r.total_cost, r.calls) for r in by_model] == [
        ("claude", Decimal("0.3"), 1),
        ("gpt-4o", Decimal("0.15"), 2),
    ]
    assert by_model[0].failed_calls == 1
    assert [(r.key, r.total_cost) for r in by_workflow] == [
        ("wf", Decimal("0.4")),
        ("other", Decimal("0.05")),
    ]
    assert [(r.key, r.calls) for r in by_day] == [("2026-03-01", 2), ("2026-03-02", 1)]
    assert [(r.key, r.total_tokens) for r in by_run] == [("r1", 30)]
    assert [(r.key, r.total_cost) for r in later] == [("gpt-4o", Decimal("0.05"))]
