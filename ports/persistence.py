"""The Persistence port: every durable read and write, inside ``transaction()``.

A ``Transaction`` is a unit of work: everything done through it commits together
or not at all (the in-memory adapter really rolls back). The job transport takes
the same transaction, so a state change and the job it creates commit together.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from treadle.kernel.events import EventBase, OutboxRecord
from treadle.kernel.model import (
    Annotation,
    IdempotencyRecord,
    JsonValue,
    LogRecord,
    Run,
    RunFilter,
    RunStatus,
    StageRun,
)
from treadle.kernel.workflows.model import InboxMessage, JournalEntry, JournalStatus, Timer
from treadle.ports.flow_control import FlowControl
from treadle.ports.retention import RetentionStore


class Transaction(Protocol):
    """Operations visible only to this unit of work until it commits."""

    @property
    def flow(self) -> FlowControl:
        """Concurrency and rate-limit accounting (``ports.flow_control``)."""
        ...

    @property
    def retention(self) -> RetentionStore:
        """Purging expired runs (``ports/retention.py``), in this unit of work."""
        ...

    # -- runs -------------------------------------------------------------
    async def insert_run(self, run: Run) -> None:
        """Insert a new run; ``DuplicateError`` if the id or (workflow, key) exists."""

    async def get_run(self, run_id: str, *, for_update: bool = False) -> Run | None:
        """The run without stages; ``for_update`` locks it until commit where supported."""

    async def find_run_by_key(self, workflow_id: str, idempotency_key: str) -> Run | None:
        """The run started with this idempotency key, if any."""

    async def update_run(self, run: Run) -> Run:
        """Store ``run`` if the stored version equals ``run.version``; returns it with the
        version bumped. ``ConcurrencyError`` when someone else updated it first."""

    async def list_runs(self, filter: RunFilter) -> list[Run]:
        """Runs matching ``filter``, newest first."""

    async def count_runs(self, group_by: str, filter: RunFilter) -> dict[str, int]:
        """Counts per ``status`` or ``workflow_id`` over the filtered runs."""

    async def claim_pending_runs(
        self,
        limit: int,
        *,
        exclude_ids: Sequence[str] = (),
        exclude_keys: Sequence[tuple[str, str | None]] = (),
    ) -> list[Run]:
        """Lock and return up to ``limit`` PENDING runs, priority desc then FIFO, past
        the runs of ``exclude_ids`` and of the flow-control keys ``exclude_keys``
        (``(workflow_id, concurrency_key)``; a ``None`` key excludes the whole workflow)."""

    async def runs_inactive_since(
        self, status: RunStatus, cutoff: datetime, limit: int
    ) -> list[Run]:
        """Runs in ``status`` whose ``updated_at`` is older than ``cutoff``."""

    # -- set-oriented forms (group commit: several commands' writes in one transaction) --
    # Each is the single-row method applied to many items in one round trip where the
    # adapter can. A failing item raises before anything of the call is visible to a
    # later, committed state: the memory adapter applies nothing of the call, the SQL
    # adapters may have written the other items, so the caller must roll back.
    async def get_runs(self, run_ids: Sequence[str], *, for_update: bool = False) -> dict[str, Run]:
        """The runs found, by id (missing ids are absent), without stages. ``for_update``
        locks them in id order, so two callers locking overlapping sets cannot deadlock."""

    async def update_runs(self, runs: Sequence[Run]) -> list[Run]:
        """``update_run`` for each, in order: returns them version-bumped with ``stages=[]``.
        ``ConcurrencyError`` naming every stale or missing run; ``ValueError`` if a run id
        occurs twice (its second update would always be stale)."""

    async def insert_runs(self, runs: Sequence[Run]) -> None:
        """``insert_run`` for each (``run.createMany``): one statement where the adapter
        can. ``DuplicateError`` if an id or a (workflow, idempotency key) exists already
        or occurs twice in ``runs``."""

    async def find_runs_by_keys(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Run]:
        """``find_run_by_key`` for each ``(workflow_id, idempotency_key)``, in one query:
        the runs found, by key (keys without a run are absent)."""

    # -- stages -----------------------------------------------------------
    async def insert_stages(self, stages: Sequence[StageRun]) -> None: ...

    async def get_stages(self, run_id: str) -> list[StageRun]:
        """All stages of a run, ordered by execution group then definition order."""

    async def get_stage(self, run_id: str, stage_id: str) -> StageRun | None: ...

    async def update_stage(self, stage: StageRun) -> StageRun:
        """Optimistic update, as ``update_run``."""

    async def get_stages_of(self, run_ids: Sequence[str]) -> dict[str, list[StageRun]]:
        """Every requested run id mapped to its stages in ``get_stages`` order (``[]`` for a
        run without stages or a missing run)."""

    async def update_stages(self, stages: Sequence[StageRun]) -> list[StageRun]:
        """``update_stage`` for each, in order: each is stored iff its stored version equals
        ``stage.version``; returns them version-bumped. ``ConcurrencyError`` naming every
        stale or missing stage; ``ValueError`` if a (run id, stage id) occurs twice."""

    async def due_suspended_stages(self, now: datetime, limit: int) -> list[StageRun]:
        """SUSPENDED stages whose ``next_poll_at`` is at or before ``now``, oldest first."""

    # -- outbox -----------------------------------------------------------
    async def append_events(self, events: Sequence[EventBase]) -> list[EventBase]:
        """Append to the outbox, assigning each run's next gap-free ``sequence``."""

    async def unpublished_events(self, limit: int) -> list[OutboxRecord]:
        """Oldest unpublished, not dead-lettered rows; per-run sequence order preserved."""

    async def mark_published(self, outbox_ids: Sequence[int]) -> None: ...

    async def record_publish_failure(
        self, outbox_id: int, error: str, *, dead_letter: bool
    ) -> None: ...

    async def dead_lettered_events(self, limit: int) -> list[OutboxRecord]: ...

    async def requeue_dead_letters(self, outbox_ids: Sequence[int]) -> int:
        """Put the dead-lettered rows among ``outbox_ids`` back in the outbox with a
        fresh retry budget (``attempts`` 0), so the next ``unpublished_events`` returns
        them in outbox order; returns how many were dead-lettered (others are skipped)."""

    async def events_for_run(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        """The run's events in sequence order, as typed models."""

    # -- idempotency ------------------------------------------------------
    async def get_idempotency(self, key: str, command_type: str) -> IdempotencyRecord | None: ...

    async def put_idempotency(self, record: IdempotencyRecord) -> None:
        """Insert or replace the record for (key, command_type)."""

    async def put_idempotency_many(self, records: Sequence[IdempotencyRecord]) -> None:
        """``put_idempotency`` for each, in order (a later record of the same key wins)."""

    async def delete_idempotency(self, key: str, command_type: str) -> None: ...

    # -- logs and annotations ----------------------------------------------
    async def append_logs(self, logs: Sequence[LogRecord]) -> None: ...

    async def get_logs(self, run_id: str) -> list[LogRecord]: ...

    async def insert_annotations(self, annotations: Sequence[Annotation]) -> None: ...

    async def find_annotation(self, run_id: str, idempotency_key: str) -> Annotation | None: ...

    async def list_annotations(
        self,
        run_id: str,
        *,
        key: str | None = None,
        key_prefix: str | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> list[Annotation]: ...

    # -- code workflows: journal, signal inbox, timers ------------------------------------
    async def get_journal(
        self,
        run_id: str,
        *,
        status: JournalStatus | None = None,
        from_position: int | None = None,
    ) -> list[JournalEntry]:
        """The run's journal entries in position order (only those in ``status`` if given;
        only those at ``from_position`` or later if given: a resumed body reads what is
        new, at a cost that does not grow with the journal)."""

    async def get_journal_entry(
        self, run_id: str, name: str, occurrence: int
    ) -> JournalEntry | None: ...

    async def latest_journal_entry(self, run_id: str, name: str) -> JournalEntry | None:
        """The entry named ``name`` with the highest occurrence (``query`` reads it)."""

    async def insert_journal_entry(self, entry: JournalEntry) -> JournalEntry:
        """Insert; returns the entry with its ``id``. ``DuplicateError`` if the run already
        has (name, occurrence) or the position."""

    async def update_journal_entry(self, entry: JournalEntry) -> JournalEntry:
        """Optimistic update by ``version``, as ``update_run``; returns it version-bumped."""

    async def insert_signal(self, message: InboxMessage) -> InboxMessage:
        """Append to the run's inbox; returns it with its ``id`` (ids grow in arrival
        order). ``DuplicateError`` if the run has a message with the same idempotency key."""

    async def next_signal(
        self, run_id: str, name: str, *, kind: str = "signal"
    ) -> InboxMessage | None:
        """The run's oldest unconsumed message of ``kind`` (signal, update) called ``name``."""

    async def consume_signal(
        self, message_id: int, consumed_at: datetime, consumed_by: str
    ) -> None:
        """Mark a message consumed; ``ConcurrencyError`` if it was consumed already or is
        missing, so no signal is ever delivered twice."""

    async def list_signals(self, run_id: str) -> list[InboxMessage]:
        """The run's inbox in arrival order, consumed or not."""

    async def find_update(self, run_id: str, update_id: str) -> InboxMessage | None:
        """The update message with this ``update_id``, if the run received it."""

    async def set_reply(self, message_id: int, reply: JsonValue) -> None:
        """Store the workflow's reply to an update; ``ConcurrencyError`` if it already has one."""

    async def schedule_timer(self, timer: Timer) -> Timer:
        """Insert or replace the timer of (run, name, occurrence), live (unfired); returns
        it with its ``id``."""

    async def pending_timers(self, run_id: str) -> list[Timer]:
        """The run's unfired timers, earliest ``fire_at`` first."""

    async def fire_timer(self, run_id: str, name: str, occurrence: int, fired_at: datetime) -> bool:
        """Mark the live timer of (run, name, occurrence) fired; ``False`` if none is live."""

    async def due_timers(self, now: datetime, limit: int, *, purpose: str) -> list[Timer]:
        """Unfired timers of ``purpose`` due at ``now`` across all runs, earliest first
        (execution timeouts, which fire whatever state the run is in)."""


class Persistence(Protocol):
    """Opens units of work. Adapters translate driver errors to ``TreadleError``s."""

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """``async with persistence.transaction() as tx:`` commits on exit, rolls back on error."""
        ...

    async def aclose(self) -> None: ...
