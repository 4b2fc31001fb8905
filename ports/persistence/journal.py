"""The journal concern of the Persistence port: a code workflow's recorded steps, in
position order, which a resumed body replays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from treadle.kernel.workflows.model import JournalEntry, JournalOwner, JournalStatus

if TYPE_CHECKING:
    from treadle.kernel.events import EventBase
    from treadle.ports.job_transport import JobTransport


class JournalStore(Protocol):
    """A code workflow's journal, as seen by one unit of work (``tx.journal``)."""

    async def entries(
        self,
        run_id: str,
        *,
        status: JournalStatus | None = None,
        from_position: int | None = None,
    ) -> list[JournalEntry]:
        """The run's journal entries in position order (only those in ``status`` if given;
        only those at ``from_position`` or later if given: a resumed body reads what is
        new, at a cost that does not grow with the journal)."""

    async def get(self, run_id: str, name: str, occurrence: int) -> JournalEntry | None:
        """The entry of (name, occurrence), if recorded."""

    async def latest(self, run_id: str, name: str) -> JournalEntry | None:
        """The entry named ``name`` with the highest occurrence (``query`` reads it)."""

    async def insert(self, entry: JournalEntry) -> JournalEntry:
        """Insert; returns the entry with its ``id``. ``DuplicateError`` if the run already
        has (name, occurrence) or the position."""

    async def update(self, entry: JournalEntry) -> JournalEntry:
        """Optimistic update by ``version``, as ``RunStore.update``; returns it version-bumped."""


class JournalAppendStore(Protocol):
    """An optional capability of a ``Transaction``: ``tx.append_journal(...)``, a code
    workflow step's commit without reads.

    Each step result an activation records used to read the run (locked), its stage
    and its job to check the activation still owns the run, then insert the entries
    and append the events. The activation knows what it owns (``JournalOwner``, from its
    first phase); an adapter that can check that in the write itself sends the whole
    commit as one statement (PostgreSQL). A transaction without the attribute, or whose
    call returns ``None``, gets the reading commit from the caller."""

    async def append_journal(
        self,
        transport: JobTransport,
        owner: JournalOwner,
        entries: Sequence[JournalEntry],
        events: Sequence[EventBase],
    ) -> list[JournalEntry] | None:
        """Insert ``entries`` (all new) and append ``events``, only if the run still has
        ``owner.run_version`` (its row locked, as ``runs.get(for_update=True)``), its stage
        ``owner.stage_version`` and the job is still LEASED to ``owner.worker_id`` at
        ``owner.job_attempts``: whatever could take the run from this activation (a cancel,
        a pause, a lease reaped, another activation) changes one of them. Returns the
        entries as stored (with their ids). A failed guard writes nothing and raises
        ``ConcurrencyError`` (an entry already recorded: ``DuplicateError``); the caller
        then commits through the reads, which decide (a ghost, most likely). ``None``,
        having written nothing, when it cannot (the caller commits through the reads).
        Nothing else is written in the transaction: an adapter may commit the statement
        by itself (PostgreSQL: without ``BEGIN``/``COMMIT``)."""
        ...
