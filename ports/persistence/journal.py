"""The journal concern of the Persistence port: a code workflow's recorded steps, in
position order, which a resumed body replays."""

from __future__ import annotations

from typing import Protocol

from treadle.kernel.workflows.model import JournalEntry, JournalStatus


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
