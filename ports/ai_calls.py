"""The AICallLogger port: recorded AI calls and each run's AI totals, as ``tx.ai_calls``.

A narrow store of its own on the persistence transaction (like ``tx.schedules``), so the
calls of an attempt and the run's totals commit in the same unit of work as the stage
result or the journaled step that made them: totals are exact whatever crashes or
retries happen, and a rolled-back commit leaves neither the calls nor their cost.

Who calls it: the kernel, when it commits a stage outcome or a step (the calls that
``ctx.ai.record`` and ``ctx.ai.generate_*`` buffered, see ``kernel/ai.py``);
``run.create`` for a budget (``set_budget``); readers (``Engine.ai_calls``,
``Engine.ai_costs``, ``runs show``/``runs list``, ``treadle costs``). Code outside the
kernel records a call through the context (``ctx.ai.record(AICall(...))``), never by
writing here directly.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from treadle.kernel.ai import AICall, AICostRow, AIGroupBy, AITotals


class AICallLogger(Protocol):
    async def record(self, calls: Sequence[AICall]) -> builtins.list[AICall]:
        """Store ``calls`` (each with its ``workflow_run_id`` set) and add them to their
        runs' totals, in this transaction; returns them with ``id`` assigned, in order."""

    async def for_run(self, run_id: str, *, limit: int = 1000) -> builtins.list[AICall]:
        """The run's calls in recording order (``id``), prompts and responses loaded."""

    async def totals(self, run_ids: Sequence[str]) -> dict[str, AITotals]:
        """Totals of the runs among ``run_ids`` that recorded a call or have a budget
        (a run absent from the answer has spent nothing and has no budget)."""

    async def set_budget(self, run_id: str, max_cost: Decimal | None) -> None:
        """Set (or clear) the run's ``max_cost``; keeps its totals."""

    async def aggregate(
        self,
        by: AIGroupBy,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        workflow_id: str | None = None,
        limit: int = 1000,
    ) -> builtins.list[AICostRow]:
        """Calls made in ``[since, until)`` (by ``created_at``) grouped ``by`` workflow
        id, model, UTC day (``YYYY-MM-DD``) or run id; most expensive first, then key."""
