"""Signals, updates and review decisions. They validate now; stage pipelines have no
place to deliver them, so they answer ``NotSupportedError`` until code workflows
(whose journal and inbox receive them) are registered."""

from __future__ import annotations

from typing import TYPE_CHECKING

from treadle.kernel import commands as c
from treadle.kernel.errors import InvalidStateError, NotSupportedError
from treadle.kernel.handlers.common import load_run

if TYPE_CHECKING:
    from treadle.kernel.kernel import Deps, Scope


async def _target(deps: Deps, run_id: str, what: str) -> None:
    async with deps.persistence.transaction() as tx:
        run = await load_run(tx, run_id, for_update=False)
    if run.status.terminal:
        raise InvalidStateError(
            f"cannot deliver {what} to run {run_id!r}: it is {run.status.value}"
        )
    wf = deps.workflow(run.workflow_id)
    raise NotSupportedError(
        f"{what} is not supported for stage pipelines (workflow {wf.id!r} is a {wf.kind})"
    )


async def signal(deps: Deps, cmd: c.RunSignal, scope: Scope) -> c.RunSignalResult:
    await _target(deps, cmd.workflow_run_id, f"signal {cmd.name!r}")
    raise AssertionError("unreachable")  # pragma: no cover


async def update(deps: Deps, cmd: c.RunUpdate, scope: Scope) -> c.RunUpdateResult:
    await _target(deps, cmd.workflow_run_id, f"update {cmd.name!r}")
    raise AssertionError("unreachable")  # pragma: no cover


async def decide_review(deps: Deps, cmd: c.ReviewDecide, scope: Scope) -> c.ReviewDecideResult:
    await _target(deps, cmd.workflow_run_id, f"review decision for {cmd.review_id!r}")
    raise AssertionError("unreachable")  # pragma: no cover
