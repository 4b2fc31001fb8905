"""The stages concern of the Persistence port: the stage rows of pipeline runs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from treadle.kernel.model import StageRun


class StageStore(Protocol):
    """Stages, as seen by one unit of work (``tx.stages``)."""

    async def insert_many(self, stages: Sequence[StageRun]) -> None:
        """Insert the stages (of one run or several); ``DuplicateError`` if one exists."""

    async def for_run(self, run_id: str) -> list[StageRun]:
        """All stages of a run, ordered by execution group then definition order."""

    async def get(self, run_id: str, stage_id: str) -> StageRun | None:
        """One stage of a run, if it exists."""

    async def update(self, stage: StageRun) -> StageRun:
        """Optimistic update, as ``RunStore.update``."""

    async def for_runs(self, run_ids: Sequence[str]) -> dict[str, list[StageRun]]:
        """Every requested run id mapped to its stages in ``for_run`` order (``[]`` for a
        run without stages or a missing run)."""

    async def update_many(self, stages: Sequence[StageRun]) -> list[StageRun]:
        """``update`` for each, in order: each is stored iff its stored version equals
        ``stage.version``; returns them version-bumped. ``ConcurrencyError`` naming every
        stale or missing stage; ``ValueError`` if a (run id, stage id) occurs twice."""

    async def due_suspended(self, now: datetime, limit: int) -> list[StageRun]:
        """SUSPENDED stages whose ``next_poll_at`` is at or before ``now``, oldest first."""
