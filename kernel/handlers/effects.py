"""Side records a stage produces while running (logs, annotations, AI calls), committed
with its outcome so a discarded attempt leaves no log or annotation behind (its AI calls
are kept, marked as a failed attempt's: they were paid for)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from treadle.kernel.ai import AITotals
from treadle.kernel.annotations import attach_in_tx
from treadle.kernel.context import StageContext
from treadle.kernel.model import LogRecord

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps
    from treadle.ports import Transaction


async def commit_stage_extras(
    deps: Deps,
    tx: Transaction,
    run_id: str,
    stage_id: str,
    ctx: StageContext[Any, Any],
    causation_id: str | None,
    *,
    failed: bool = False,
) -> None:
    """Write what ``ctx`` buffered; ``failed``: the attempt failed, so its AI calls are
    marked ``failed_attempt``."""
    if ctx.ai_calls is not None and ctx.ai_calls.calls:
        await tx.ai_calls.record(ctx.ai_calls.drain(failed=failed))
    if ctx.logs:
        await tx.logs.append(
            [
                LogRecord(
                    workflow_run_id=run_id,
                    stage_id=stage_id,
                    level=entry.level,
                    message=entry.message,
                    fields=entry.fields,
                    timestamp=entry.timestamp,
                )
                for entry in ctx.logs
            ]
        )
        log = deps.logger.bind(run_id=run_id, stage_id=stage_id)
        for entry in ctx.logs:
            getattr(
                log, entry.level if entry.level in ("debug", "info", "warning", "error") else "info"
            )(entry.message, **entry.fields)
    if ctx.annotations:
        for attributes, actor, scope in ctx.annotations:
            await attach_in_tx(
                deps,
                tx,
                run_id,
                attributes,
                actor=actor,
                scope=scope,
                stage_id=stage_id,
                causation_id=causation_id,
            )


async def read_ai_totals(deps: Deps, run_id: str) -> AITotals | None:
    """The run's committed AI totals and budget, in a short transaction of its own (a
    budget check before a call)."""
    async with deps.persistence.transaction() as tx:
        return (await tx.ai_calls.totals([run_id])).get(run_id)
