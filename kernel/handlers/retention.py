"""``run.purge``: delete terminal runs past their retention, in small batches.

The maintenance tick sends it without ``older_than``: each run is kept for its
workflow's ``retention`` (``@workflow(retention=...)``, ``WorkflowBuilder(retention=...)``)
or, failing that, ``KernelSettings.default_retention``; a workflow with neither keeps
its runs forever. ``treadle purge --older-than`` sends one ``older_than`` for every
workflow. Either way only terminal runs are selected, and storage deletes a run only
if it is still terminal in the purge's transaction (``ports/retention.py``).

Rows go in one transaction per batch (``max_runs``); the run's blobs (artifacts under
``runs/<id>/``, offloaded payloads) are deleted after it commits: a blob store cannot
join the transaction, and a blob left by a crash in between is only an orphan, never
a row pointing at nothing.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, cast

import treadle.kernel.commands as c
from treadle.kernel.model import RunStatus

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps, Scope

TERMINAL = frozenset(s for s in RunStatus if s.terminal)


def run_blob_prefix(run_id: str) -> str:
    """Where a run's artifacts live in the blob store (``context.artifact_prefix``)."""
    return f"runs/{run_id}/"


def retains(deps: Deps) -> bool:
    """Whether any run can expire: the engine has a default retention or a registered
    workflow has its own (otherwise a host skips ``run.purge``: it would find nothing)."""
    if deps.settings.default_retention is not None:
        return True
    ids = getattr(deps.registry, "ids", None)
    if ids is None:
        return False
    return any(
        wf is not None and wf.retention is not None
        for wf in (deps.registry.get_workflow(wf_id) for wf_id in ids())
    )


def retention_cutoffs(
    deps: Deps, now: datetime, workflow_id: str | None = None
) -> tuple[dict[str, datetime], datetime | None]:
    """Per registered workflow with a ``retention``, the time before which its runs
    expire; and the engine default's cutoff for every other workflow (``None``: keep)."""
    default = deps.settings.default_retention
    default_cutoff = now - default if default is not None else None
    ids_of = getattr(deps.registry, "ids", None)
    ids: list[str] = list(ids_of()) if ids_of is not None else []
    if workflow_id is not None:
        ids = [workflow_id]
    cutoffs: dict[str, datetime] = {}
    for wf_id in ids:
        wf = deps.registry.get_workflow(wf_id)
        keep = wf.retention if wf is not None else None
        if keep is not None:
            cutoffs[wf_id] = now - keep
        elif workflow_id is not None and default_cutoff is not None:
            cutoffs[wf_id] = default_cutoff
    if workflow_id is not None:
        return cutoffs, None
    return cutoffs, default_cutoff


BLOB_CONCURRENCY = 16
"""Blob prefixes listed and deleted at once: a blob store is a network hop per call."""


async def _delete_blobs(deps: Deps, prefixes: list[str]) -> int:
    """Delete every blob under ``prefixes``: in one call where the store can
    (``BlobRetention``), else listed and deleted ``BLOB_CONCURRENCY`` prefixes at a time;
    returns how many."""
    if not prefixes:
        return 0
    bulk = getattr(deps.blob_store, "delete_prefixes", None)
    if bulk is not None:
        return int(await bulk(prefixes))
    gate = asyncio.Semaphore(BLOB_CONCURRENCY)

    async def one(prefix: str) -> int:
        async with gate:
            keys = await deps.blob_store.list(prefix)
            for key in keys:
                await deps.blob_store.delete(key)
            return len(keys)

    return sum(await asyncio.gather(*(one(prefix) for prefix in prefixes)))


async def purge(deps: Deps, cmd: c.RunPurge, scope: Scope) -> c.RunPurgeResult:
    now = deps.clock.now()
    statuses = frozenset(cmd.statuses) if cmd.statuses else TERMINAL
    if cmd.older_than is not None:
        cutoff = now - cmd.older_than
        cutoffs = {cmd.workflow_id: cutoff} if cmd.workflow_id is not None else {}
        default_cutoff = None if cmd.workflow_id is not None else cutoff
    else:
        cutoffs, default_cutoff = retention_cutoffs(deps, now, cmd.workflow_id)
    prefixes: list[str] = []
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunPurgeResult", cached)
        ids = await tx.retention.expired_runs(
            cutoffs=cutoffs, default_cutoff=default_cutoff, statuses=statuses, limit=cmd.max_runs
        )
        selected = len(ids)
        if not cmd.dry_run and ids:
            ids = await tx.retention.purge_runs(ids)
            # A job transport that keeps jobs outside these tables (``JobRetention``).
            forget = getattr(deps.job_transport, "forget_runs", None)
            if forget is not None:
                await forget(tx, ids)
            for run_id in ids:
                prefixes.append(run_blob_prefix(run_id))
                prefixes.extend(tx.retention.blob_prefixes(run_id))
    blobs = await _delete_blobs(deps, prefixes)
    if ids and not cmd.dry_run:
        deps.logger.info("runs.purged", runs=len(ids), blobs=blobs)
    result = c.RunPurgeResult(
        purged=len(ids),
        workflow_run_ids=ids,
        blobs_deleted=blobs,
        more=selected >= cmd.max_runs,
        dry_run=cmd.dry_run,
    )
    if scope.key is not None:
        async with deps.persistence.transaction() as tx:
            await scope.complete(tx, result)
    return result
