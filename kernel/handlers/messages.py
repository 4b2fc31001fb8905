"""Signals, updates and review decisions. Stage pipelines have no place to deliver
them and answer ``NotSupportedError``; signals to code workflows go to their inbox
(``handlers.workflows``), and so do updates and review decisions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import treadle.kernel.commands as c
from treadle.kernel.errors import InvalidStateError, NotSupportedError
from treadle.kernel.handlers import workflows
from treadle.kernel.handlers.basics import load_run

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps, Scope


async def _target(deps: Deps, run_id: str, what: str) -> None:
    async with deps.persistence.transaction() as tx:
        run = await load_run(tx, run_id, for_update=False)
    if run.status.terminal:
        raise InvalidStateError(
            f"cannot deliver {what} to run {run_id!r}: it is {run.status.value}"
        )
    wf = deps.workflow(run.workflow_id, run.workflow_version)
    if wf.kind == "code":
        return
    raise NotSupportedError(
        f"{what} is not supported for stage pipelines (workflow {wf.id!r} is a {wf.kind})"
    )


async def signal(deps: Deps, cmd: c.RunSignal, scope: Scope) -> c.RunSignalResult:
    return await workflows.signal(deps, cmd, scope)


async def update(deps: Deps, cmd: c.RunUpdate, scope: Scope) -> c.RunUpdateResult:
    return await workflows.update(deps, cmd, scope)


async def decide_review(deps: Deps, cmd: c.ReviewDecide, scope: Scope) -> c.ReviewDecideResult:
    await _target(deps, cmd.workflow_run_id, f"review decision for {cmd.review_id!r}")
    return await workflows.decide_review(deps, cmd, scope)
