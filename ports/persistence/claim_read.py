"""An optional capability of a ``Transaction``: a claim's reads as one unlocked statement.

``run.claimPending`` reads the PENDING runs it may start (in claim order, skipping runs
another claim has locked), their stages and, for a code workflow, its timers. Under
locks that is a read per concern inside ``BEGIN ... COMMIT``. ``claim_candidates`` reads
them together, and an adapter may send that as one statement that holds no lock past
itself; the kernel then writes the claim with ``write_set`` (``write_set.py``), whose run
update requires each run still to have the version read, so a run claimed, cancelled or
paused in between makes the write fail as a whole and the kernel claims again under
locks. A persistence offers it by setting ``claim_reads = True``; a transaction without
the method, or whose call returns ``None``, gets the locking reads (``runs.claim_pending``,
``stages.for_run``, ``timers.pending``) from the caller, which never depends on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from treadle.kernel.model import Run, StageRun

__all__ = ["ClaimReadStore"]


class ClaimReadStore(Protocol):
    """``tx.claim_candidates(limit)``: the adapter's one-statement read of a claim."""

    async def claim_candidates(
        self, limit: int
    ) -> tuple[list[Run], dict[str, list[StageRun]], set[str]] | None:
        """Up to ``limit`` PENDING, unpaused runs in claim order (priority descending,
        then oldest first, then id), skipping any another transaction holds locked, as
        ``runs.claim_pending`` picks them; each run's stages (``stages.for_run`` order);
        and the ids of those runs that have an unfired timer. The row locks taken may
        end with the statement: the caller's writes must be guarded by the versions
        read. ``None``, having read nothing, when the adapter cannot."""
        ...
