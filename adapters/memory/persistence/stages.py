"""Stages of pipeline runs in the in-memory adapter: the ``Stages`` concern of one
``InMemoryTransaction``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from operator import attrgetter

from treadle.adapters.memory.persistence.shared import MemoryUnit, _reject_duplicates
from treadle.kernel.errors import ConcurrencyError, DuplicateError
from treadle.kernel.model import (
    StageRun,
    StageStatus,
    evolve,
)

# Bound once: an enum member read through its class costs several global reads.
_SUSPENDED = StageStatus.SUSPENDED


_execution_group = attrgetter("execution_group")

_NO_STAGES: dict[str, StageRun] = {}
"""What ``update`` looks a stage up in when its run has none (never written to)."""


class MemoryStages:
    """Stage rows on this transaction's store (``tx.stages``, the ``StageStore`` port)."""

    __slots__ = ("_s", "_tx", "_undo")

    def __init__(self, tx: MemoryUnit) -> None:
        self._tx = tx
        self._s = tx._s
        self._undo = tx._undo

    async def insert_many(self, stages: Sequence[StageRun]) -> None:
        self._tx._check()
        for stage in stages:
            per_run = self._s.stages.get(stage.workflow_run_id)
            if per_run is None:
                raise DuplicateError(f"run {stage.workflow_run_id!r} does not exist")
            if stage.stage_id in per_run:
                raise DuplicateError(
                    f"stage {stage.stage_id!r} of run {stage.workflow_run_id!r} already exists"
                )
            self._tx.set_item(per_run, stage.stage_id, stage)
            self._index_suspended(stage)
        for run_id in {stage.workflow_run_id for stage in stages}:
            self._keep_group_order(run_id)

    def _keep_group_order(self, run_id: str) -> None:
        """Keep a run's stages dict in (execution group, insertion) order, so reading
        them needs no sort. run.create inserts in that order already; anything else gets
        a re-ordered copy, whose replacement the undo log reverts like any write."""
        per_run = self._s.stages[run_id]
        groups = [stage.execution_group for stage in per_run.values()]
        if groups != sorted(groups):
            ordered = sorted(per_run.values(), key=_execution_group)  # stable
            self._tx.set_item(self._s.stages, run_id, {st.stage_id: st for st in ordered})

    async def for_run(self, run_id: str) -> list[StageRun]:
        # Group order, insertion (definition) order within a group; an update keeps a
        # key's position (see _keep_group_order).
        per_run = self._s.stages.get(run_id)
        return list(per_run.values()) if per_run else []

    async def get(self, run_id: str, stage_id: str) -> StageRun | None:
        found: StageRun | None = self._s.stages.get(run_id, {}).get(stage_id)
        return found

    async def update(self, stage: StageRun) -> StageRun:
        if not self._tx.active:
            self._tx._check()
        # The fields through each model's ``__dict__``: one read through pydantic's
        # ``__getattr__`` hook rather than one per field (this runs twice per stage).
        fields = stage.__dict__
        run_id, stage_id, version = fields["workflow_run_id"], fields["stage_id"], fields["version"]
        per_run = self._s.stages.get(run_id, _NO_STAGES)
        stored = per_run.get(stage_id)
        if stored is None:
            raise ConcurrencyError(f"stage {stage_id!r} of run {run_id!r} was updated concurrently")
        was = stored.__dict__
        if was["version"] != version:
            raise ConcurrencyError(f"stage {stage_id!r} of run {run_id!r} was updated concurrently")
        new = evolve(stage, {"version": version + 1})
        self._undo.append((per_run, stage_id, stored))  # set_item, inlined
        per_run[stage_id] = new
        if fields["status"] is _SUSPENDED or self._s.suspended:
            self._index_suspended(new)
        if fields["execution_group"] != was["execution_group"]:
            self._keep_group_order(run_id)
        return new

    async def for_runs(self, run_ids: Sequence[str]) -> dict[str, list[StageRun]]:
        return {run_id: await self.for_run(run_id) for run_id in run_ids}

    async def update_many(self, stages: Sequence[StageRun]) -> list[StageRun]:
        self._tx._check()
        _reject_duplicates([(s.workflow_run_id, s.stage_id) for s in stages], "stage")
        all_stages = self._s.stages
        stale = []
        for stage in stages:
            stored = all_stages.get(stage.workflow_run_id, {}).get(stage.stage_id)
            if stored is None or stored.version != stage.version:
                stale.append(f"{stage.stage_id!r} of run {stage.workflow_run_id!r}")
        if stale:
            raise ConcurrencyError(
                f"stage(s) {', '.join(stale)} were updated concurrently or do not exist"
            )
        return [await self.update(stage) for stage in stages]

    def _index_suspended(self, stage: StageRun) -> None:
        suspended = self._s.suspended
        if stage.status is _SUSPENDED:
            self._tx.set_item(suspended, (stage.workflow_run_id, stage.stage_id), None)
        elif suspended:  # most updates: nothing suspended, no key to build
            self._tx.del_item(suspended, (stage.workflow_run_id, stage.stage_id))

    async def due_suspended(self, now: datetime, limit: int) -> list[StageRun]:
        due = []
        for run_id, stage_id in self._s.suspended:
            stage = self._s.stages[run_id][stage_id]
            if stage.next_poll_at is not None and stage.next_poll_at <= now:
                due.append(stage)
        due.sort(key=lambda s: (s.next_poll_at or now, s.workflow_run_id, s.stage_id))
        return due[:limit]
