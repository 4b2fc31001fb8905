"""Side records a stage produces while running (logs, annotations), committed with
its outcome so a discarded attempt leaves none behind."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
) -> None:
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
