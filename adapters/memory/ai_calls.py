"""``InMemoryAICallLogger``: the AICallLogger port over plain dicts, in a memory transaction.

Writes go through the transaction's undo log (``set_item``), so a rolled-back stage
commit leaves neither its calls nor their cost in the run's totals, as on SQL.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from treadle.kernel.ai import AICall, AICostRow, AIGroupBy, AITotals
from treadle.kernel.model import evolve


class UndoLog(Protocol):
    """What the store needs of ``InMemoryTransaction`` (named by this Protocol, so the
    transaction's module and this one do not import each other)."""

    def set_item(self, mapping: dict[Any, Any], key: Any, value: Any) -> None: ...

    def del_item(self, mapping: dict[Any, Any], key: Any) -> None: ...


@dataclass
class AICallRows:
    """The in-memory tables: calls by id, each run's call ids, each run's totals."""

    calls: dict[int, AICall] = field(default_factory=dict)
    by_run: dict[str, tuple[int, ...]] = field(default_factory=dict)
    totals: dict[str, AITotals] = field(default_factory=dict)
    next_id: list[int] = field(default_factory=lambda: [0])


class InMemoryAICallLogger:
    def __init__(self, tx: UndoLog, rows: AICallRows) -> None:
        self._tx = tx
        self._rows = rows

    async def record(self, calls: Sequence[AICall]) -> builtins.list[AICall]:
        rows, stored = self._rows, []
        by_run: dict[str, list[AICall]] = {}
        for call in calls:
            if not call.workflow_run_id:
                raise ValueError("an AICall to store needs its workflow_run_id")
            rows.next_id[0] += 1  # ids are never reused, rolled back or not (as SQL)
            new = evolve(call, {"id": rows.next_id[0]})
            self._tx.set_item(rows.calls, new.id, new)
            stored.append(new)
            by_run.setdefault(new.workflow_run_id, []).append(new)
        for run_id, added in by_run.items():
            ids = rows.by_run.get(run_id, ())
            self._tx.set_item(rows.by_run, run_id, (*ids, *(c.id for c in added)))
            current = rows.totals.get(run_id) or AITotals(workflow_run_id=run_id)
            self._tx.set_item(rows.totals, run_id, current.add(added))
        return stored

    async def for_run(self, run_id: str, *, limit: int = 1000) -> builtins.list[AICall]:
        return [self._rows.calls[i] for i in self._rows.by_run.get(run_id, ())[:limit]]

    async def totals(self, run_ids: Sequence[str]) -> dict[str, AITotals]:
        return {r: self._rows.totals[r] for r in run_ids if r in self._rows.totals}

    async def set_budget(self, run_id: str, max_cost: Decimal | None) -> None:
        current = self._rows.totals.get(run_id) or AITotals(workflow_run_id=run_id)
        self._tx.set_item(self._rows.totals, run_id, evolve(current, {"max_cost": max_cost}))

    async def aggregate(
        self,
        by: AIGroupBy,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        workflow_id: str | None = None,
        limit: int = 1000,
    ) -> builtins.list[AICostRow]:
        groups: dict[str, list[AICall]] = {}
        for call in self._rows.calls.values():
            at = call.created_at
            if since is not None and (at is None or at < since):
                continue
            if until is not None and (at is None or at >= until):
                continue
            if workflow_id is not None and call.workflow_id != workflow_id:
                continue
            groups.setdefault(group_key(call, by), []).append(call)
        found = [summarise(key, calls) for key, calls in groups.items()]
        found.sort(key=lambda row: (-row.total_cost, row.key))
        return found[:limit]


def group_key(call: AICall, by: AIGroupBy) -> str:
    if by == "workflow":
        return call.workflow_id
    if by == "model":
        return call.model
    if by == "run":
        return call.workflow_run_id
    return call.created_at.date().isoformat() if call.created_at is not None else ""


def summarise(key: str, calls: Sequence[AICall]) -> AICostRow:
    return AICostRow(
        key=key,
        calls=len(calls),
        failed_calls=sum(c.failed_attempt for c in calls),
        input_tokens=sum(c.input_tokens for c in calls),
        output_tokens=sum(c.output_tokens for c in calls),
        total_tokens=sum(c.total_tokens for c in calls),
        total_cost=sum((c.cost or Decimal(0) for c in calls), Decimal(0)),
    )
