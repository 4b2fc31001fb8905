"""``tx.retention`` in memory: the SQL adapter's purge over plain dictionaries.

Every deletion goes through the transaction's undo log (``del_item``), so a purge that
fails half-way leaves everything as it was, as on SQL. Selection scans the runs; the
fake is for tests and small apps, not for millions of runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from treadle.adapters.memory.ai_calls import AICallRows
from treadle.kernel.events import EventBase
from treadle.kernel.model import IdempotencyRecord, Run, RunStatus


class Undo(Protocol):
    """What retention uses of an ``InMemoryTransaction`` (which imports this module)."""

    def del_item(self, mapping: dict[Any, Any], key: Any) -> None: ...

    def on_rollback(self, fn: Callable[[], None]) -> None: ...


class _Feed(Protocol):
    """What a purge uses of the store's event feed (``persistence.shared.EventFeed``)."""

    def rows(self) -> list[tuple[int, EventBase]]: ...

    def replace(self, rows: Sequence[tuple[int, EventBase]]) -> None: ...

    def __len__(self) -> int: ...


class Store(Protocol):
    """The ``InMemoryPersistence`` dictionaries a purge deletes from."""

    runs: dict[str, Run]
    run_keys: dict[tuple[str, str], str]
    stages: dict[str, Any]
    suspended: dict[tuple[str, str], None]
    event_seq: dict[str, int]
    events_by_run: dict[str, Any]
    logs: dict[str, Any]
    annotations: dict[str, Any]
    outbox: dict[int, Any]
    unpublished: dict[int, None]
    dead: dict[int, None]
    idempotency: dict[tuple[str, str], Any]

    @property
    def feed(self) -> _Feed: ...

    journal: dict[str, Any]
    journal_keys: dict[tuple[str, str, int], int]
    journal_order: dict[str, Any]
    journal_by_status: dict[Any, Any]
    inbox: dict[int, Any]
    inbox_by_run: dict[str, Any]
    inbox_keys: dict[tuple[str, str], int]
    unconsumed: dict[tuple[str, str, str], Any]
    timers: dict[tuple[str, str, int], Any]
    live_timers: dict[str, Any]
    ai_calls: AICallRows

    def idempotency_record(self, key: str, command_type: str) -> IdempotencyRecord | None: ...


class InMemoryRetention:
    """The retention operations of one ``InMemoryTransaction``."""

    def __init__(self, tx: Undo, store: Store) -> None:
        self._tx = tx
        self._s = store

    async def expired_runs(
        self,
        *,
        cutoffs: Mapping[str, datetime],
        default_cutoff: datetime | None,
        statuses: frozenset[RunStatus],
        limit: int,
    ) -> list[str]:
        found = []
        for run in self._s.runs.values():
            if not run.status.terminal or run.status not in statuses:
                continue
            cutoff = cutoffs.get(run.workflow_id, default_cutoff)
            ended = run.completed_at
            if cutoff is not None and ended is not None and ended < cutoff:
                found.append((ended, run.id))
        found.sort()
        return [run_id for _, run_id in found[:limit]]

    async def purge_runs(self, run_ids: Sequence[str]) -> list[str]:
        s, tx = self._s, self._tx
        ids = [
            run_id
            for run_id in dict.fromkeys(run_ids)
            if run_id in s.runs and s.runs[run_id].status.terminal
        ]
        gone = set(ids)
        for run_id in ids:
            run = s.runs[run_id]
            if run.idempotency_key is not None:
                tx.del_item(s.run_keys, (run.workflow_id, run.idempotency_key))
            for stage_id in list(s.stages.get(run_id, {})):
                tx.del_item(s.suspended, (run_id, stage_id))
            for mapping in (s.stages, s.event_seq, s.events_by_run, s.logs, s.annotations):
                tx.del_item(mapping, run_id)
            self._purge_journal(run_id)
            for call_id in s.ai_calls.by_run.get(run_id, ()):
                tx.del_item(s.ai_calls.calls, call_id)
            tx.del_item(s.ai_calls.by_run, run_id)
            tx.del_item(s.ai_calls.totals, run_id)
            tx.del_item(s.runs, run_id)
        self._purge_keyed(gone)
        if gone and len(s.feed):
            before = s.feed.rows()
            kept = [row for row in before if row[1].workflow_run_id not in gone]
            if len(kept) != len(before):
                s.feed.replace(kept)
                tx.on_rollback(lambda: s.feed.replace(before))
        return ids

    def _purge_journal(self, run_id: str) -> None:
        s, tx = self._s, self._tx
        for entry in list(s.journal.get(run_id, {}).values()):
            tx.del_item(s.journal_keys, (run_id, entry.name, entry.occurrence))
            tx.del_item(s.journal_by_status, (run_id, entry.status))
        tx.del_item(s.journal, run_id)
        tx.del_item(s.journal_order, run_id)
        for message_id in s.inbox_by_run.get(run_id, ()):
            message = s.inbox.get(message_id)
            if message is not None and message.idempotency_key is not None:
                tx.del_item(s.inbox_keys, (run_id, message.idempotency_key))
            tx.del_item(s.inbox, message_id)
        tx.del_item(s.inbox_by_run, run_id)
        tx.del_item(s.live_timers, run_id)

    def _purge_keyed(self, gone: set[str]) -> None:
        """Rows keyed by something other than the run: outbox, inbox waits, timers,
        idempotency records (each found by a scan)."""
        s, tx = self._s, self._tx
        for outbox_id, row in list(s.outbox.items()):
            event = row if isinstance(row, EventBase) else row.event
            if event.workflow_run_id in gone:
                for mapping in (s.outbox, s.unpublished, s.dead):
                    tx.del_item(mapping, outbox_id)
        for waiting in [k for k in s.unconsumed if k[0] in gone]:
            tx.del_item(s.unconsumed, waiting)
        for timer in [k for k in s.timers if k[0] in gone]:
            tx.del_item(s.timers, timer)
        for key in list(s.idempotency):
            record = s.idempotency_record(*key)
            result = record.result if record is not None else None
            if isinstance(result, dict) and result.get("workflow_run_id") in gone:
                tx.del_item(s.idempotency, key)

    def blob_prefixes(self, run_id: str) -> list[str]:
        return []  # nothing is offloaded in memory
