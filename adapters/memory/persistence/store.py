"""In-memory Persistence: plain dictionaries behind one lock, with a real rollback.

Every mutation inside a transaction records how to undo itself; an exception
inside ``async with persistence.transaction()`` replays the undo log backwards,
so a failed command leaves exactly the state it found. Transactions are
serialised by an ``asyncio.Lock`` (like SQLite's single writer), which the
in-memory job transport shares so it never sees uncommitted jobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from treadle.adapters.event_feed import EventCallback, EventWatchers
from treadle.adapters.memory.ai_calls import AICallRows, InMemoryAICallLogger
from treadle.adapters.memory.flow_control import InMemoryFlowControl
from treadle.adapters.memory.persistence.annotations import MemoryAnnotations
from treadle.adapters.memory.persistence.idempotency import MemoryIdempotency
from treadle.adapters.memory.persistence.inbox import MemoryInbox
from treadle.adapters.memory.persistence.journal import MemoryJournal
from treadle.adapters.memory.persistence.logs import MemoryLogs
from treadle.adapters.memory.persistence.outbox import MemoryOutbox
from treadle.adapters.memory.persistence.runs import MemoryRuns
from treadle.adapters.memory.persistence.shared import _MISSING, EventFeed, _idempotency_record
from treadle.adapters.memory.persistence.stages import MemoryStages
from treadle.adapters.memory.persistence.timers import MemoryTimers
from treadle.adapters.memory.retention import InMemoryRetention
from treadle.adapters.memory.schedules import InMemoryScheduleStore
from treadle.adapters.run_ends import RunEndCallback, RunEndWatchers
from treadle.kernel.errors import TreadleError
from treadle.kernel.events import EventBase, OutboxRecord
from treadle.kernel.model import (
    Annotation,
    IdempotencyRecord,
    LogRecord,
    Run,
    StageRun,
    evolve,
)
from treadle.kernel.schedules import Schedule
from treadle.kernel.workflows.model import InboxMessage, JournalEntry, JournalStatus, Timer

if TYPE_CHECKING:
    from treadle.kernel.model import Job
    from treadle.ports import JobTransport

_S = TypeVar("_S")


class _LazyStore(Generic[_S]):
    """A concern store built on its first use in a transaction, then kept in the
    transaction's ``__dict__`` (this non-data descriptor then steps aside: later reads
    are plain attribute reads). Most transactions never touch these concerns, so they
    pay nothing for them."""

    __slots__ = ("_build", "_name")

    def __init__(self, build: Callable[[InMemoryTransaction], _S]) -> None:
        self._build = build
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, tx: None, owner: type | None = None) -> _LazyStore[_S]: ...

    @overload
    def __get__(self, tx: InMemoryTransaction, owner: type | None = None) -> _S: ...

    def __get__(
        self, tx: InMemoryTransaction | None, owner: type | None = None
    ) -> _S | _LazyStore[_S]:
        if tx is None:
            return self
        store = tx.__dict__[self._name] = self._build(tx)
        if tx.lazy is None:
            tx.lazy = []
        tx.lazy.append(store)  # for ``end`` to point at the ended transaction
        return store


class InMemoryTransaction:
    """A unit of work over ``InMemoryPersistence``; see the module docstring."""

    def __init__(self, store: InMemoryPersistence) -> None:
        self._s = store
        # (mapping, key, previous value) to restore, or (None, callback, None).
        self._undo: list[tuple[Any, Any, Any]] = []
        self._once: list[Callable[[], None]] | None = None
        self.active = True
        self.ended_runs: list[str] | None = None
        """Runs this transaction finished: told to ``run_ends`` once it commits."""
        self.final_runs: dict[str, Run] | None = None
        """The terminal runs this transaction wrote, told along with ``ended_runs``."""
        self.appended_events = False
        """Whether it appended events: ``event_watchers`` are told once it commits."""
        self.lazy: list[Any] | None = None
        """The concern stores built on first use (``_LazyStore``), if any."""
        # One store per concern (the ``Transaction`` port's attributes), sharing this
        # unit of work's undo log. The concerns every stage's commit touches are built
        # here; the others (``_LazyStore`` below) on first use.
        self.runs = MemoryRuns(self)
        self.stages = MemoryStages(self)
        self.outbox = MemoryOutbox(self)

    async def write_set(
        self,
        transport: JobTransport,
        *,
        runs: Sequence[Run],
        new_jobs: Sequence[Job],
        completed_jobs: Sequence[str],
        leases: Mapping[str, tuple[str, int]] | None,
        stages: Sequence[StageRun],
        events: Sequence[EventBase],
        last: bool = False,
        prior: Mapping[str, Run] | None = None,
        prior_stages: Mapping[tuple[str, str], StageRun] | None = None,
    ) -> bool:
        """The ``WriteSetStore`` capability (``ports/persistence/write_set.py``) by the
        per-kind calls, in their order: memory has no round trips to save, and this
        undo log makes them one unit already."""
        if runs:
            await self.runs.update_many(runs)
        if new_jobs:
            await transport.enqueue(self, new_jobs)
        if completed_jobs:
            await transport.complete_many(self, completed_jobs, leases=leases)
        if stages:
            await self.stages.update_many(stages)
        if events:
            await self.outbox.append(events)
        return True

    idempotency = _LazyStore(MemoryIdempotency)  # keyed commands only: not a chained stage
    annotations = _LazyStore(MemoryAnnotations)
    logs = _LazyStore(MemoryLogs)
    journal = _LazyStore(MemoryJournal)
    inbox = _LazyStore(MemoryInbox)
    timers = _LazyStore(MemoryTimers)

    @property
    def flow(self) -> InMemoryFlowControl:
        """The FlowControl concern (``ports.flow_control``) on this transaction."""
        return InMemoryFlowControl(self._s.runs.values())

    @property
    def schedules(self) -> InMemoryScheduleStore:
        """Cron schedules in this unit of work (``adapters/memory/schedules.py``)."""
        return InMemoryScheduleStore(self, self._s.schedules)

    @property
    def ai_calls(self) -> InMemoryAICallLogger:
        """Recorded AI calls and run totals in this unit of work
        (``adapters/memory/ai_calls.py``)."""
        return InMemoryAICallLogger(self, self._s.ai_calls)

    @property
    def retention(self) -> InMemoryRetention:
        """Purging expired runs in this transaction (``adapters/memory/retention.py``)."""
        return InMemoryRetention(self, self._s)

    def end(self) -> None:
        """Mark the transaction ended and point its stores at the store's ended
        transaction (``InMemoryPersistence.ended``): a store kept past the end still
        refuses writes, and the transaction and its stores, which refer to each other,
        are freed by reference counting instead of by the cyclic garbage collector."""
        self.active = False
        ended = self._s.ended
        self.runs._tx = ended
        self.stages._tx = ended
        self.outbox._tx = ended
        if self.lazy is not None:  # the lazily built stores this transaction used
            for store in self.lazy:
                store._tx = ended

    # -- undo bookkeeping ------------------------------------------------------
    def on_rollback(self, fn: Callable[[], None]) -> None:
        self._undo.append((None, fn, None))

    def on_rollback_once(self, fn: Callable[[], None]) -> None:
        """``on_rollback`` unless ``fn`` (compared by equality) is registered already."""
        if self._once is None:
            self._once = []
        elif fn in self._once:  # identity, then equality
            return
        self._once.append(fn)
        self._undo.append((None, fn, None))

    def set_item(self, mapping: dict[Any, Any], key: Any, value: Any) -> None:
        self._undo.append((mapping, key, mapping.get(key, _MISSING)))
        mapping[key] = value

    def del_item(self, mapping: dict[Any, Any], key: Any) -> None:
        if key in mapping:
            self._undo.append((mapping, key, mapping.pop(key)))

    def rollback(self) -> None:
        while self._undo:
            mapping, key, previous = self._undo.pop()
            if mapping is None:
                key()
            elif previous is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = previous

    def _check(self) -> None:
        if not self.active:
            raise TreadleError("transaction used after it ended")

    # -- runs -------------------------------------------------------------------

    # -- set-oriented forms: every item is checked before any is written, so a failing
    # call applies nothing even if the caller catches the error and goes on.

    # -- stages -----------------------------------------------------------------

    # -- outbox -----------------------------------------------------------------

    # -- idempotency ------------------------------------------------------------

    # -- logs and annotations -----------------------------------------------------

    # -- code workflows: journal, signal inbox, timers ------------------------------------
    # Same undo log as everything above, so a rolled-back transaction leaves no entry,
    # message, consumption or timer behind.


class _TransactionScope:
    """``async with persistence.transaction() as tx``: takes the lock, commits on a clean
    exit, replays the undo log on an exception. A plain class rather than an
    ``@asynccontextmanager`` generator: every command enters two or three of these."""

    __slots__ = ("_store", "_tx")

    def __init__(self, store: InMemoryPersistence) -> None:
        self._store = store
        self._tx: InMemoryTransaction | None = None

    async def __aenter__(self) -> InMemoryTransaction:
        await self._store.lock.acquire()
        self._tx = InMemoryTransaction(self._store)
        return self._tx

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        store, tx = self._store, self._tx
        assert tx is not None
        try:
            tx.end()
            if exc_type is None:
                store.commits += 1
            else:
                tx.rollback()
                store.rollbacks += 1
        finally:
            self._tx = None
            store.lock.release()
        if exc_type is None and tx.ended_runs is not None:
            store.run_ends.tell(tx.ended_runs, tx.final_runs)
        if exc_type is None and tx.appended_events and store.event_watchers:
            store.event_watchers.tell()


class InMemoryPersistence:
    """Complete in-memory Persistence; state is plain attributes tests may inspect."""

    local_reads = True
    """Reads cost no round trip here: the kernel reads back what it writes on (see
    ``jobs._commit_trusted``) rather than buffering to save reads it need not save."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.runs: dict[str, Run] = {}
        self.run_keys: dict[tuple[str, str], str] = {}
        self.stages: dict[str, dict[str, StageRun]] = {}
        self.suspended: dict[tuple[str, str], None] = {}
        self.event_seq: dict[str, int] = {}
        # An outbox row that never failed to publish is kept as its bare event (see
        # ``outbox_record``); one with publication bookkeeping as its ``OutboxRecord``.
        self.outbox: dict[int, OutboxRecord | EventBase] = {}
        self._outbox_proto: OutboxRecord | None = None
        self.unpublished: dict[int, None] = {}
        self.dead: dict[int, None] = {}
        self.events_by_run: dict[str, list[EventBase]] = {}
        self.feed = EventFeed()
        """Every event with its outbox id, in id order (``events_after``)."""
        self.next_outbox_id = 0
        # Completed records compacted (see ``_idempotency_record``); read them through
        # ``idempotency_record``.
        self.idempotency: dict[
            tuple[str, str], IdempotencyRecord | tuple[str, str, datetime, bytes]
        ] = {}
        self.logs: dict[str, list[LogRecord]] = {}
        self.annotations: dict[str, list[Annotation]] = {}
        self.commits = 0
        self.rollbacks = 0
        # -- code workflows (see the transaction's section of the same name) --
        self.journal: dict[str, dict[int, JournalEntry]] = {}
        self.journal_keys: dict[tuple[str, str, int], int] = {}
        self.journal_order: dict[str, list[int]] = {}
        """run id -> its journal positions in order: ``get_journal(from_position=...)``
        bisects it instead of sorting the run's whole journal."""
        self.journal_by_status: dict[tuple[str, JournalStatus], dict[int, None]] = {}
        """(run id, status) -> positions of the run's entries in that status."""
        self.next_journal_id = 0
        self.inbox: dict[int, InboxMessage] = {}
        self.inbox_by_run: dict[str, list[int]] = {}
        self.inbox_keys: dict[tuple[str, str], int] = {}
        self.unconsumed: dict[tuple[str, str, str], tuple[int, ...]] = {}
        """(run id, kind, name) -> ids of the messages not consumed yet, oldest first: the
        next one is found without walking the run's whole inbox."""
        self.next_inbox_id = 0
        self.timers: dict[tuple[str, str, int], Timer] = {}
        self.live_timers: dict[str, tuple[tuple[str, str, int], ...]] = {}
        """run id -> keys of its timers not fired yet (``pending_timers`` reads only those)."""
        self.next_timer_id = 0
        self.run_ends = RunEndWatchers()
        self.event_watchers = EventWatchers()
        self.schedules: dict[str, Schedule] = {}
        """Cron schedules by id (``adapters/memory/schedules.py``)."""
        self.ai_calls = AICallRows()
        """Recorded AI calls and run totals (``adapters/memory/ai_calls.py``)."""
        self.ended = InMemoryTransaction(self)
        """The stores of an ended transaction point here (``InMemoryTransaction.end``)."""
        self.ended.active = False

    def next_schedule_fire_at(self) -> datetime | None:
        """The earliest fire time of the unpaused schedules, read without a transaction:
        ``schedule.fireDue`` asks it first, so a tick without due schedules costs nothing
        here (and a chaos-wrapped harness rolls no dice for it)."""
        return min(
            (s.next_fire_at for s in self.schedules.values() if not s.paused and s.next_fire_at),
            default=None,
        )

    def transaction(self) -> _TransactionScope:
        return _TransactionScope(self)

    def watch_run_ends(self, callback: RunEndCallback) -> Callable[[], None]:
        """Call ``callback(run_ids, outcomes)`` after each commit that finished runs (see
        ``adapters.run_ends``); returns the function that stops it."""
        return self.run_ends.watch(callback)

    def watch_events(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback()`` after each commit that appended events (see
        ``adapters.event_feed``); returns the function that stops it."""
        return self.event_watchers.watch(callback)

    async def aclose(self) -> None:
        return None

    def outbox_record(self, outbox_id: int) -> OutboxRecord:
        """The outbox row ``outbox_id`` as ``OutboxRecord``. A row without publication
        bookkeeping yet is stored as its event alone (one object fewer per event for the
        garbage collector to walk while a round's events wait for ``outbox.flush``) and
        its record is built when read (``record_of``)."""
        stored = self.outbox[outbox_id]
        if isinstance(stored, OutboxRecord):
            return stored
        return self.record_of(outbox_id, stored)

    def record_of(self, outbox_id: int, event: EventBase) -> OutboxRecord:
        """The record of a row stored as its bare ``event``: a copy of a validated record
        with the defaults, as the id and the event are the store's own, already valid."""
        return evolve(self.outbox_proto(outbox_id), {"id": outbox_id, "event": event})

    def outbox_proto(self, outbox_id: int) -> OutboxRecord:
        """A validated record with the defaults, built once from a stored row, for
        ``record_of`` to copy."""
        if self._outbox_proto is None:
            stored = self.outbox[outbox_id]
            event = stored.event if isinstance(stored, OutboxRecord) else stored
            self._outbox_proto = OutboxRecord(id=outbox_id, event=event)
        return self._outbox_proto

    def idempotency_record(self, key: str, command_type: str) -> IdempotencyRecord | None:
        """The stored record of ``(key, command_type)``, outside any transaction."""
        return _idempotency_record(self.idempotency.get((key, command_type)))

    def next_timer_at(self, purpose: str) -> datetime | None:
        """Earliest unfired timer of ``purpose`` (for the virtual clock)."""
        times = [
            t.fire_at for t in self.timers.values() if t.fired_at is None and t.purpose == purpose
        ]
        return min(times, default=None)

    def next_suspended_poll_at(self) -> datetime | None:
        """Earliest ``next_poll_at`` among suspended stages (for the virtual clock)."""
        times = [
            self.stages[r][s].next_poll_at
            for r, s in self.suspended
            if self.stages[r][s].next_poll_at is not None
        ]
        return min((t for t in times if t is not None), default=None)
