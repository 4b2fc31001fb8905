"""Code-workflow journals in the in-memory adapter: the ``Journal`` concern of one
``InMemoryTransaction``."""

from __future__ import annotations

import bisect
import functools

from treadle.adapters.memory.persistence.shared import MemoryUnit
from treadle.kernel.errors import ConcurrencyError, DuplicateError
from treadle.kernel.model import (
    evolve,
)
from treadle.kernel.workflows.model import JournalEntry, JournalStatus


class MemoryJournal:
    """Code-workflow journals on this transaction's store (``tx.journal``)."""

    __slots__ = ("_s", "_tx", "_undo")

    def __init__(self, tx: MemoryUnit) -> None:
        self._tx = tx
        self._s = tx._s
        self._undo = tx._undo

    async def entries(
        self,
        run_id: str,
        *,
        status: JournalStatus | None = None,
        from_position: int | None = None,
    ) -> list[JournalEntry]:
        s = self._s
        per_run = s.journal.get(run_id, {})
        start = -1 if from_position is None else from_position
        if status is not None:  # through the status index: a run waits on few entries
            chosen = sorted(p for p in s.journal_by_status.get((run_id, status), ()) if p >= start)
            return [per_run[p] for p in chosen]
        order = s.journal_order.get(run_id, [])
        return [per_run[p] for p in order[bisect.bisect_left(order, start) :]]

    async def get(self, run_id: str, name: str, occurrence: int) -> JournalEntry | None:
        position = self._s.journal_keys.get((run_id, name, occurrence))
        return None if position is None else self._s.journal[run_id][position]

    async def latest(self, run_id: str, name: str) -> JournalEntry | None:
        found = [e for e in self._s.journal.get(run_id, {}).values() if e.name == name]
        return max(found, key=lambda e: e.occurrence, default=None)

    async def insert(self, entry: JournalEntry) -> JournalEntry:
        self._tx._check()
        s = self._s
        run_id = entry.workflow_run_id
        key = (run_id, entry.name, entry.occurrence)
        per_run = s.journal.get(run_id, {})
        if key in s.journal_keys or entry.position in per_run:
            raise DuplicateError(
                f"journal of run {run_id!r} already has {entry.name!r} #{entry.occurrence} "
                f"or position {entry.position}"
            )
        if run_id not in s.journal:
            self._tx.set_item(s.journal, run_id, per_run)
        s.next_journal_id += 1
        stored = evolve(entry, {"id": s.next_journal_id, "version": 0})
        self._tx.set_item(per_run, entry.position, stored)
        self._tx.set_item(s.journal_keys, key, entry.position)
        order = s.journal_order.setdefault(run_id, [])
        bisect.insort(order, entry.position)
        self._tx.on_rollback(functools.partial(order.remove, entry.position))
        self._index_status(run_id, entry.position, None, stored.status)
        return stored

    def _index_status(
        self,
        run_id: str,
        position: int,
        old: JournalStatus | None,
        new: JournalStatus,
    ) -> None:
        if old is new:
            return
        s = self._s
        if old is not None:
            self._tx.del_item(s.journal_by_status[(run_id, old)], position)
        bucket = s.journal_by_status.get((run_id, new))
        if bucket is None:
            bucket = {}
            self._tx.set_item(s.journal_by_status, (run_id, new), bucket)
        self._tx.set_item(bucket, position, None)

    async def update(self, entry: JournalEntry) -> JournalEntry:
        self._tx._check()
        per_run = self._s.journal.get(entry.workflow_run_id, {})
        stored = per_run.get(entry.position)
        if (
            stored is None
            or stored.version != entry.version
            or (stored.name, stored.occurrence) != (entry.name, entry.occurrence)
        ):
            raise ConcurrencyError(
                f"journal entry {entry.name!r} #{entry.occurrence} of run "
                f"{entry.workflow_run_id!r} was updated concurrently"
            )
        new = evolve(entry, {"version": entry.version + 1, "id": stored.id})
        self._tx.set_item(per_run, entry.position, new)
        self._index_status(entry.workflow_run_id, entry.position, stored.status, new.status)
        return new
