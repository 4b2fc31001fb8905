"""The outbox in the in-memory adapter: the ``Outbox`` concern of one
``InMemoryTransaction``."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from itertools import islice
from typing import Any

from treadle.adapters.memory.persistence.shared import _MISSING, MemoryUnit, _in_id_order
from treadle.kernel.events import RUN_END_EVENTS, EventBase, OutboxRecord
from treadle.kernel.model import (
    evolve,
)


def _unappend_events(
    store: Any,
    first_id: int,
    count: int,
    previous: dict[str, int | None],
) -> None:
    """Undo of ``append``: its ``count`` rows from ``first_id`` on leave every index, and
    each run's sequence goes back to ``previous`` (the run got the numbers in between, so
    that many events come off the end of its list)."""
    for outbox_id in range(first_id, first_id + count):
        store.outbox.pop(outbox_id, None)
        store.unpublished.pop(outbox_id, None)
    store.feed.drop_last(count)
    seqs, by_run = store.event_seq, store.events_by_run
    for run_id, seq in previous.items():
        appended = seqs[run_id] - (seq or 0)
        del by_run[run_id][len(by_run[run_id]) - appended :]
        if seq is None:
            seqs.pop(run_id, None)
        else:
            seqs[run_id] = seq


def _unpublish(store: Any, removed: list[tuple[int, OutboxRecord | EventBase, bool, bool]]) -> None:
    """Undo of ``mark_published``: the rows return, and each index is put back in outbox id
    order (the order rows were appended in), so a run's events still publish in order."""
    for outbox_id, record, was_unpublished, was_dead in removed:
        store.outbox[outbox_id] = record
        if was_unpublished:
            store.unpublished[outbox_id] = None
        if was_dead:
            store.dead[outbox_id] = None
    _in_id_order(store.outbox)
    _in_id_order(store.unpublished)
    _in_id_order(store.dead)


class MemoryOutbox:
    """The outbox on this transaction's store (``tx.outbox``, the ``OutboxStore`` port)."""

    __slots__ = ("_s", "_tx", "_undo")

    def __init__(self, tx: MemoryUnit) -> None:
        self._tx = tx
        self._s = tx._s
        self._undo = tx._undo

    async def append(self, events: Sequence[EventBase]) -> list[EventBase]:
        if not self._tx.active:
            self._tx._check()
        if not events:
            return []
        s = self._s
        seqs, outbox, unpublished, by_run = s.event_seq, s.outbox, s.unpublished, s.events_by_run
        feed_ids, feed_events = s.feed.ids, s.feed.events
        first_id = s.next_outbox_id + 1
        outbox_id = s.next_outbox_id
        # The sequences before this call, per run, for the undo entry.
        previous: dict[str, int | None] = {}
        stored: list[EventBase] = []
        ended: list[str] | None = None
        for event in events:
            # One read of the event's fields for all the reads below: each attribute read
            # of a pydantic model goes through its ``__getattr__`` hook.
            fields = event.__dict__
            run_id = fields["workflow_run_id"]
            last = seqs.get(run_id)
            if run_id not in previous:
                previous[run_id] = last
            seq = 1 if last is None else last + 1
            seqs[run_id] = seq
            event = evolve(event, {"sequence": seq})
            outbox_id += 1
            outbox[outbox_id] = event  # the row's record is built when read
            unpublished[outbox_id] = None
            bucket = by_run.get(run_id)
            if bucket is None:
                bucket = by_run[run_id] = []
            bucket.append(event)
            stored.append(event)
            feed_ids.append(outbox_id)
            feed_events.append(event)
            if fields.get("type") in RUN_END_EVENTS:
                if ended is None:
                    ended = []
                ended.append(run_id)
        s.next_outbox_id = outbox_id
        self._tx.appended_events = True
        if ended:
            if self._tx.ended_runs is None:
                self._tx.ended_runs = []
            self._tx.ended_runs.extend(ended)
        # One undo entry for the whole call: its outbox ids are fresh and consecutive, so
        # undoing is removing them again and restoring each run's sequence.
        self._undo.append(
            (None, functools.partial(_unappend_events, s, first_id, len(stored), previous), None)
        )
        return stored

    async def unpublished(self, limit: int) -> list[OutboxRecord]:
        s = self._s
        outbox = s.outbox
        out: list[OutboxRecord] = []
        if limit <= 0 or not s.unpublished:
            return out
        proto = s.outbox_proto(next(iter(s.unpublished)))
        for outbox_id in islice(s.unpublished, limit):
            stored = outbox[outbox_id]
            if isinstance(stored, OutboxRecord):
                out.append(stored)
            else:  # a bare event: its record with the defaults (see ``outbox_record``)
                out.append(evolve(proto, {"id": outbox_id, "event": stored}))
        return out

    async def mark_published(self, outbox_ids: Sequence[int]) -> None:
        self._tx._check()
        s = self._s
        outbox, unpublished, dead = s.outbox, s.unpublished, s.dead
        # Published rows leave the outbox (``unpublished`` and ``dead`` are its indexes),
        # with one undo entry for the batch rather than one per write.
        removed: list[tuple[int, OutboxRecord | EventBase, bool, bool]] = []
        for outbox_id in outbox_ids:
            record = outbox.pop(outbox_id, None)
            if record is None:
                continue  # already published (published rows leave the outbox), as in SQL
            was_unpublished = unpublished.pop(outbox_id, _MISSING) is not _MISSING
            was_dead = bool(dead) and dead.pop(outbox_id, _MISSING) is not _MISSING
            removed.append((outbox_id, record, was_unpublished, was_dead))
        if removed:
            self._undo.append((None, functools.partial(_unpublish, s, removed), None))

    async def record_failure(
        self, outbox_id: int, error: str, *, dead_letter: bool, retry_at: datetime | None = None
    ) -> None:
        self._tx._check()
        record = self._s.outbox_record(outbox_id)
        self._tx.set_item(
            self._s.outbox,
            outbox_id,
            evolve(
                record,
                {
                    "attempts": record.attempts + 1,
                    "last_error": error,
                    "dead_lettered": dead_letter,
                    "retry_at": retry_at,
                },
            ),
        )
        if dead_letter:
            self._tx.del_item(self._s.unpublished, outbox_id)
            self._tx.set_item(self._s.dead, outbox_id, None)

    async def dead_lettered(self, limit: int) -> list[OutboxRecord]:
        return [self._s.outbox_record(i) for i in sorted(self._s.dead)[:limit]]

    async def requeue_dead_letters(self, outbox_ids: Sequence[int]) -> int:
        self._tx._check()
        s = self._s
        revived = [i for i in dict.fromkeys(outbox_ids) if i in s.dead]
        for outbox_id in revived:
            record = s.outbox_record(outbox_id)
            self._tx.set_item(
                s.outbox,
                outbox_id,
                evolve(record, {"attempts": 0, "dead_lettered": False, "retry_at": None}),
            )
            self._tx.del_item(s.dead, outbox_id)
            self._tx.set_item(s.unpublished, outbox_id, None)
        if revived:
            # ``unpublished`` is read in insertion order: put the revived rows back at their
            # place (outbox id order), before a run's later events still waiting there.
            # Rolling back only removes them again, which keeps that order.
            _in_id_order(s.unpublished)
        return len(revived)

    async def events_for_run(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        return [e for e in self._s.events_by_run.get(run_id, []) if e.sequence > after_sequence]

    async def events_after(self, after_id: int, limit: int) -> list[tuple[int, EventBase]]:
        return self._s.feed.after(after_id, limit)  # type: ignore[no-any-return]

    async def last_event_id(self) -> int:
        return self._s.feed.last_id()  # type: ignore[no-any-return]
