"""``SqlAICallLogger``: the AICallLogger port on the ``ai_calls`` and ``ai_run_totals``
tables.

It runs on its transaction's connection (``tx.ai_calls``), so an attempt's calls and its
run's new totals commit with the stage result or journaled step that made them. Costs
are stored as integers in units of 1e-9 of the currency (``cost_nanos``): sums are exact
on both dialects, with no driver-specific decimal handling. ``prompt`` and ``response``
are payload columns: offloaded to the blob store past the threshold, under the run's
prefix (``payloads/<run id>/``), so retention deletes them with the run.

A run's totals row is updated in place (``UPDATE ... SET calls = calls + n``); the first
call of a run inserts it. Every writer of a run's calls holds the run's row lock (a stage
commit and a step commit both lock the run first), so the update-else-insert cannot race.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

import sqlalchemy as sa

from treadle.adapters.sql import schema as t
from treadle.kernel.ai import AICall, AICostRow, AIGroupBy, AITotals
from treadle.kernel.model import evolve

_NANO = Decimal("1e-9")


def to_nanos(value: Decimal | None) -> int | None:
    """Whole 1e-9 units of ``value`` (rounded half-even), as stored."""
    if value is None:
        return None
    return int((value / _NANO).to_integral_value())


def from_nanos(value: int | None) -> Decimal | None:
    if value is None:
        return None
    return (Decimal(int(value)) * _NANO).normalize() if value else Decimal(0)


class SqlUnitOfWork(Protocol):
    """What the store needs of ``SqlTransaction`` (named by this Protocol, so the
    transaction's module and this one do not import each other)."""

    @property
    def is_postgres(self) -> bool: ...

    async def execute(
        self, statement: sa.Executable, what: str = ..., parameters: Any = ...
    ) -> Any: ...

    async def _put_payload(self, scope: str | None, value: Any) -> Any: ...

    async def _get_payload(self, value: Any, run_id: str | None) -> Any: ...


_COUNTERS = ("total_cost_nanos", "input_tokens", "output_tokens", "calls", "failed_calls")


class SqlAICallLogger:
    def __init__(self, tx: SqlUnitOfWork) -> None:
        self._tx = tx

    async def record(self, calls: Sequence[AICall]) -> builtins.list[AICall]:
        if not calls:
            return []
        rows: list[dict[str, Any]] = []
        added: dict[str, dict[str, int]] = {}
        for call in calls:
            if not call.workflow_run_id:
                raise ValueError("an AICall to store needs its workflow_run_id")
            run_id = call.workflow_run_id
            rows.append(
                {
                    "run_id": run_id,
                    "workflow_id": call.workflow_id,
                    "stage_id": call.stage_id,
                    "step": call.step,
                    "attempt": call.attempt,
                    "topic": call.topic,
                    "call_type": call.call_type,
                    "provider": call.provider,
                    "model": call.model,
                    "prompt": await self._tx._put_payload(run_id, call.prompt),
                    "response": await self._tx._put_payload(run_id, call.response),
                    "input_tokens": call.input_tokens,
                    "output_tokens": call.output_tokens,
                    "cost_nanos": to_nanos(call.cost),
                    "currency": call.currency,
                    "latency": call.latency,
                    "error": call.error,
                    "failed_attempt": call.failed_attempt,
                    "created_at": call.created_at,
                }
            )
            sums = added.setdefault(run_id, dict.fromkeys(_COUNTERS, 0))
            sums["total_cost_nanos"] += to_nanos(call.cost) or 0
            sums["input_tokens"] += call.input_tokens
            sums["output_tokens"] += call.output_tokens
            sums["calls"] += 1
            sums["failed_calls"] += int(call.failed_attempt)
        # One statement for all of them (a batch stage records hundreds), the ids back in
        # the order of the rows (SQLAlchemy's insertmanyvalues, ``sort_by_parameter_order``).
        result = await self._tx.execute(
            sa.insert(t.ai_calls).returning(t.ai_calls.c.id, sort_by_parameter_order=True),
            "record AI calls",
            rows,
        )
        ids = [int(row[0]) for row in result]
        stored = [evolve(call, {"id": i}) for call, i in zip(calls, ids, strict=True)]
        for run_id, sums in added.items():
            await self._add(run_id, sums)
        return stored

    async def _add(self, run_id: str, sums: dict[str, int]) -> None:
        totals = t.ai_run_totals
        result = await self._tx.execute(
            totals.update()
            .where(totals.c.run_id == run_id)
            .values({name: totals.c[name] + value for name, value in sums.items()}),
            "add to AI totals",
        )
        if result.rowcount == 0:
            await self._tx.execute(
                totals.insert().values(run_id=run_id, max_cost_nanos=None, **sums),
                "insert AI totals",
            )

    async def for_run(self, run_id: str, *, limit: int = 1000) -> builtins.list[AICall]:
        query = (
            sa.select(t.ai_calls)
            .where(t.ai_calls.c.run_id == run_id)
            .order_by(t.ai_calls.c.id)
            .limit(limit)
        )
        rows = await self._tx.execute(query, "AI calls of a run")
        return [await self._call(row) for row in rows]

    async def _call(self, row: Any) -> AICall:
        return AICall(
            id=row.id,
            workflow_run_id=row.run_id,
            workflow_id=row.workflow_id,
            stage_id=row.stage_id,
            step=row.step,
            attempt=row.attempt,
            topic=row.topic,
            call_type=row.call_type,
            provider=row.provider,
            model=row.model,
            prompt=await self._tx._get_payload(row.prompt, row.run_id),
            response=await self._tx._get_payload(row.response, row.run_id),
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            cost=from_nanos(row.cost_nanos),
            currency=row.currency,
            latency=row.latency,
            error=row.error,
            failed_attempt=row.failed_attempt,
            created_at=row.created_at,
        )

    async def totals(self, run_ids: Sequence[str]) -> dict[str, AITotals]:
        if not run_ids:
            return {}
        totals = t.ai_run_totals
        query = sa.select(totals).where(totals.c.run_id.in_(list(dict.fromkeys(run_ids))))
        found = {}
        for row in await self._tx.execute(query, "AI totals"):
            found[row.run_id] = AITotals(
                workflow_run_id=row.run_id,
                total_cost=from_nanos(row.total_cost_nanos) or Decimal(0),
                total_tokens=row.input_tokens + row.output_tokens,
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                calls=row.calls,
                failed_calls=row.failed_calls,
                max_cost=from_nanos(row.max_cost_nanos),
            )
        return found

    async def set_budget(self, run_id: str, max_cost: Decimal | None) -> None:
        totals = t.ai_run_totals
        result = await self._tx.execute(
            totals.update()
            .where(totals.c.run_id == run_id)
            .values(max_cost_nanos=to_nanos(max_cost)),
            "set AI budget",
        )
        if result.rowcount == 0:
            await self._tx.execute(
                totals.insert().values(
                    run_id=run_id, max_cost_nanos=to_nanos(max_cost), **dict.fromkeys(_COUNTERS, 0)
                ),
                "insert AI budget",
            )

    async def aggregate(
        self,
        by: AIGroupBy,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        workflow_id: str | None = None,
        limit: int = 1000,
    ) -> builtins.list[AICostRow]:
        calls = t.ai_calls
        key: sa.ColumnElement[Any]
        if by == "workflow":
            key = calls.c.workflow_id
        elif by == "model":
            key = calls.c.model
        elif by == "run":
            key = calls.c.run_id
        elif self._tx.is_postgres:  # sessions run in UTC (adapters/sql/engine.py)
            key = sa.func.to_char(calls.c.created_at, "YYYY-MM-DD")
        else:  # stored as UTC wall-time text
            key = sa.func.substr(calls.c.created_at, 1, 10)
        cost = sa.func.coalesce(sa.func.sum(calls.c.cost_nanos), 0)
        query = sa.select(
            key.label("key"),
            sa.func.count().label("calls"),
            sa.func.sum(sa.case((calls.c.failed_attempt, 1), else_=0)).label("failed"),
            sa.func.sum(calls.c.input_tokens).label("input_tokens"),
            sa.func.sum(calls.c.output_tokens).label("output_tokens"),
            cost.label("cost"),
        )
        if since is not None:
            query = query.where(calls.c.created_at >= since)
        if until is not None:
            query = query.where(calls.c.created_at < until)
        if workflow_id is not None:
            query = query.where(calls.c.workflow_id == workflow_id)
        query = query.group_by(key).order_by(cost.desc(), key).limit(limit)
        return [
            AICostRow(
                key=str(row.key),
                calls=int(row.calls),
                failed_calls=int(row.failed or 0),
                input_tokens=int(row.input_tokens or 0),
                output_tokens=int(row.output_tokens or 0),
                total_tokens=int(row.input_tokens or 0) + int(row.output_tokens or 0),
                total_cost=from_nanos(int(row.cost)) or Decimal(0),
            )
            for row in await self._tx.execute(query, "aggregate AI costs")
        ]
