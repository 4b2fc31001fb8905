"""Which PENDING runs a ``run.claimPending`` may start, under concurrency and rate
limits (``kernel/flow_control.py`` decides; this module reads and locks through
``tx.flow``).

Most claims touch no limited workflow and pay nothing but one check per run. Otherwise
the claim locks the keys of its limited candidates (sorted, so claimers never deadlock),
counts their usage, and admits in order. Candidates it passes over stay PENDING and
locked by this transaction until it commits; the claim then looks further down the
queue, past the full keys, so a full key never starves the runs behind it.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import treadle.kernel.flow_control as flow
from treadle.kernel.model import Run

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps
    from treadle.ports import Transaction

MAX_PASSES = 3
"""Claim passes past full keys before the claim settles for what it found."""


def any_limited(deps: Deps, runs: list[Run]) -> bool:
    """Whether a concurrency or rate limit applies to any of ``runs``: the one check a
    claim of unlimited workflows pays per run."""
    for run in runs:
        wf = deps.find_workflow(run.workflow_id, run.workflow_version)
        if wf is not None and flow.limited(wf):
            return True
    return False


async def admit_runs(
    deps: Deps, tx: Transaction, runs: list[Run], room: int, now: datetime
) -> flow.Admission:
    """The runs of ``runs`` (locked PENDING candidates, in claim order) to start, at
    most ``room``, plus further candidates when limits passed some over."""
    verdict = flow.Admission()
    seen: list[str] = []
    for _ in range(MAX_PASSES):
        seen.extend(run.id for run in runs)
        step = await _admit_batch(
            deps, tx, runs, room - len(verdict.admitted), now, verdict.admitted
        )
        verdict.admitted.extend(step.admitted)
        verdict.deferred += step.deferred
        if step.retry_at is not None and (
            verdict.retry_at is None or step.retry_at < verdict.retry_at
        ):
            verdict.retry_at = step.retry_at
        verdict.blocked |= step.blocked
        if not step.blocked or len(verdict.admitted) >= room:
            break
        runs = await tx.runs.claim_pending(
            room - len(verdict.admitted),
            exclude_ids=seen,
            exclude_keys=sorted(verdict.blocked, key=_order),
        )
        if not runs:
            break
    return verdict


async def _admit_batch(
    deps: Deps,
    tx: Transaction,
    runs: list[Run],
    room: int,
    now: datetime,
    earlier: list[Run],
) -> flow.Admission:
    """One pass. ``earlier``: the runs admitted by the claim's previous passes, which
    storage does not count yet (they become RUNNING when the claim writes them)."""
    candidates: list[tuple[Run, WorkflowDefinition | None]] = []
    workflows: dict[str, WorkflowDefinition] = {}
    keys: set[flow.FlowKey] = set()
    for run in runs:
        wf = deps.find_workflow(run.workflow_id, run.workflow_version)
        candidates.append((run, wf))  # an unknown workflow: _claim_runs skips and logs it
        if wf is not None and flow.limited(wf):
            workflows[wf.id] = wf
            keys.update(flow.keys_of(wf, run))
    if not keys:
        return flow.Admission(admitted=[run for run, _ in candidates][:room])
    ordered = sorted(keys, key=_order)
    await tx.flow.lock(ordered)
    usage = await tx.flow.usage(ordered, flow.windows(workflows, ordered, now))
    for run in earlier:
        wf = deps.find_workflow(run.workflow_id, run.workflow_version)
        if wf is not None and flow.limited(wf):
            for key in flow.keys_of(wf, run):
                if key in usage:
                    found = usage[key]
                    usage[key] = flow.Usage(
                        found.active + 1, found.started + 1, found.oldest_start or now
                    )
    return flow.admit(candidates, usage, room)


def _order(key: flow.FlowKey) -> tuple[str, str]:
    return (key[0], "" if key[1] is None else "=" + key[1])
