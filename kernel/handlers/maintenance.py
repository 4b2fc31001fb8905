"""Recovery sweeps: release leases of dead workers, and repair or fail stuck runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import treadle.kernel.commands as c
from treadle.kernel.handlers.basics import enqueue_stages
from treadle.kernel.handlers.common import apply_transition, fail_run
from treadle.kernel.handlers.leases import settle_lease
from treadle.kernel.model import RunStatus, StageStatus, evolve

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps, Scope


async def reap_stale(deps: Deps, cmd: c.LeaseReapStale, scope: Scope) -> c.LeaseReapStaleResult:
    """A leased job whose worker stopped heartbeating for ``stale_threshold`` is released
    with backoff, or failed (with its stage) once it has used ``max_attempts``
    (``settle_lease``, the path every lease without a verdict takes)."""
    now = deps.clock.now()
    released = failed = 0
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.LeaseReapStaleResult", cached)
        for job in await deps.job_transport.stale_leases(tx, now - cmd.stale_threshold):
            message = (
                f"lease expired: worker {job.worker_id!r} stopped heartbeating "
                f"(attempt {job.attempts} of {job.max_attempts})"
            )
            settled = await settle_lease(
                deps,
                tx,
                job,
                end="expired",
                message=message,
                now=now,
                causation_id=scope.causation_id,
            )
            if settled == "failed":
                failed += 1
            else:
                released += 1
        result = c.LeaseReapStaleResult(released=released, failed=failed)
        await scope.complete(tx, result)
    return result


async def reap_stuck(deps: Deps, cmd: c.RunReapStuck, scope: Scope) -> c.RunReapStuckResult:
    """For RUNNING runs idle past ``stuck_threshold``: apply a transition that was missed,
    re-enqueue stages of the current group that have no live job (the sweep), and
    fail runs that have nothing live and nothing to re-enqueue."""
    now = deps.clock.now()
    transitioned = failed = 0
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunReapStuckResult", cached)
        idle = await tx.runs.inactive_since(
            RunStatus.RUNNING, now - cmd.stuck_threshold, cmd.max_runs
        )
        for run in idle:
            if run.paused:  # idle on purpose until run.resume
                continue
            wf = deps.find_workflow(run.workflow_id, run.workflow_version)
            if wf is None:
                continue
            stages = await tx.stages.for_run(run.id)
            decision, updated = await apply_transition(
                deps, tx, run, stages, wf, now, scope.causation_id
            )
            if decision.action != "noop":
                transitioned += 1
                continue
            live = {j.stage_id for j in await deps.job_transport.live_jobs(tx, run.id)}
            orphans = [
                s
                for s in stages
                if s.execution_group <= run.current_group
                and s.status in (StageStatus.PENDING, StageStatus.RUNNING)
                and s.stage_id not in live
            ]
            if orphans:
                reset = [
                    await tx.stages.update(evolve(s, {"status": StageStatus.PENDING}))
                    for s in orphans
                ]
                await enqueue_stages(deps, tx, updated, wf, reset, now)
                await tx.runs.update(evolve(updated, {"updated_at": now}))
                transitioned += 1
            elif not live:
                await fail_run(
                    deps,
                    tx,
                    updated,
                    stages,
                    f"run stuck: no activity since {run.updated_at.isoformat()} and no live job",
                    now,
                    scope.causation_id,
                )
                failed += 1
            else:
                await tx.runs.update(evolve(updated, {"updated_at": now}))
        result = c.RunReapStuckResult(transitioned=transitioned, failed=failed)
        await scope.complete(tx, result)
    return result
