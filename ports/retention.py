"""The Retention port: find terminal runs past their retention, and delete them whole.

Reached as ``tx.retention`` on a persistence transaction, so a purge commits with the
same unit of work as everything else (and the in-memory adapter really rolls it back).
It is its own narrow protocol rather than more methods on ``Transaction``: a purge
touches every table, but nothing else in the kernel needs to.

Storage is the last guard of the rule that matters: ``purge_runs`` deletes a run only
if it is terminal *in the transaction*, whatever ids it is given, so a run resumed or
rerun between selection and deletion is never purged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from treadle.kernel.model import RunStatus


class RetentionStore(Protocol):
    """Retention's storage operations, inside the transaction that owns them."""

    async def expired_runs(
        self,
        *,
        cutoffs: Mapping[str, datetime],
        default_cutoff: datetime | None,
        statuses: frozenset[RunStatus],
        limit: int,
    ) -> list[str]:
        """Ids of runs in ``statuses`` (terminal ones only; others are ignored) that ended
        before their cutoff: ``cutoffs[workflow_id]``, or ``default_cutoff`` for a
        workflow not in ``cutoffs`` (``None``: such runs are kept). A run ended at its
        ``completed_at``, which every terminal run has. Oldest first."""

    async def purge_runs(self, run_ids: Sequence[str]) -> list[str]:
        """Delete the runs among ``run_ids`` that are terminal now, with their stages,
        jobs, journal, signal inbox, timers, outbox rows and event counter, logs,
        annotations and the idempotency records whose result names them; returns the
        ids deleted. Blobs are not deleted here (see ``blob_prefixes``)."""

    def blob_prefixes(self, run_id: str) -> list[str]:
        """Blob-store key prefixes under which this storage keeps the run's payloads
        (offloaded JSON); the kernel deletes them after the purge commits."""
        ...


class JobRetention(Protocol):
    """What a job transport that keeps its jobs outside the persistence's tables (the
    in-memory one) offers retention: ``purge_runs`` cannot reach them."""

    async def forget_runs(self, tx: Any, run_ids: Sequence[str]) -> int:
        """Delete the jobs of ``run_ids`` that are no longer live, inside ``tx``."""
        ...


class BlobRetention(Protocol):
    """What a blob store offers retention beyond the ``BlobStore`` port: deleting many
    prefixes in one call (a store without it gets ``list`` and ``delete`` per key)."""

    async def delete_prefixes(self, prefixes: Sequence[str]) -> int:
        """Delete every blob whose key starts with one of ``prefixes``; returns how many."""
        ...
