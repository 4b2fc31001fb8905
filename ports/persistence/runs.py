"""The runs concern of the Persistence port: workflow runs, one row each, without stages.

Set-oriented forms (``get_many``, ``update_many``, ``insert_many``, ``find_by_keys``)
serve group commit: several commands' writes in one transaction. Each is the single-row
method applied to many items in one round trip where the adapter can. A failing item
raises before anything of the call is visible to a later, committed state: the memory
adapter applies nothing of the call, the SQL adapters may have written the other items,
so the caller must roll back.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from treadle.kernel.model import Run, RunFilter, RunStatus


class RunStore(Protocol):
    """Runs, as seen by one unit of work (``tx.runs``)."""

    async def insert(self, run: Run) -> None:
        """Insert a new run; ``DuplicateError`` if the id or (workflow, key) exists."""

    async def get(self, run_id: str, *, for_update: bool = False) -> Run | None:
        """The run without stages; ``for_update`` locks it until commit where supported."""

    async def find_by_key(self, workflow_id: str, idempotency_key: str) -> Run | None:
        """The run started with this idempotency key, if any."""

    async def update(self, run: Run) -> Run:
        """Store ``run`` if the stored version equals ``run.version``; returns it with the
        version bumped. ``ConcurrencyError`` when someone else updated it first."""

    async def query(self, filter: RunFilter) -> list[Run]:
        """Runs matching ``filter`` (status, workflow, search attributes, ...), newest first."""

    async def count(self, group_by: str, filter: RunFilter) -> dict[str, int]:
        """Counts per ``status`` or ``workflow_id`` over the filtered runs."""

    async def claim_pending(
        self,
        limit: int,
        *,
        exclude_ids: Sequence[str] = (),
        exclude_keys: Sequence[tuple[str, str | None]] = (),
    ) -> list[Run]:
        """Lock and return up to ``limit`` PENDING runs, priority desc then FIFO, past
        the runs of ``exclude_ids`` and of the flow-control keys ``exclude_keys``
        (``(workflow_id, concurrency_key)``; a ``None`` key excludes the whole workflow)."""

    async def inactive_since(self, status: RunStatus, cutoff: datetime, limit: int) -> list[Run]:
        """Runs in ``status`` whose ``updated_at`` is older than ``cutoff``."""

    async def get_many(self, run_ids: Sequence[str], *, for_update: bool = False) -> dict[str, Run]:
        """The runs found, by id (missing ids are absent), without stages. ``for_update``
        locks them in id order, so two callers locking overlapping sets cannot deadlock."""

    async def update_many(self, runs: Sequence[Run]) -> list[Run]:
        """``update`` for each, in order: returns them version-bumped with ``stages=[]``.
        ``ConcurrencyError`` naming every stale or missing run; ``ValueError`` if a run id
        occurs twice (its second update would always be stale)."""

    async def insert_many(self, runs: Sequence[Run]) -> None:
        """``insert`` for each (``run.createMany``): one statement where the adapter
        can. ``DuplicateError`` if an id or a (workflow, idempotency key) exists already
        or occurs twice in ``runs``."""

    async def find_by_keys(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Run]:
        """``find_by_key`` for each ``(workflow_id, idempotency_key)``, in one query:
        the runs found, by key (keys without a run are absent)."""
