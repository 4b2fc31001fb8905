"""In-memory Persistence: plain dictionaries behind one lock, with a real rollback.

Every mutation inside a transaction records how to undo itself; an exception
inside ``async with persistence.transaction()`` replays the undo log backwards,
so a failed command leaves exactly the state it found. Transactions are
serialised by an ``asyncio.Lock`` (like SQLite's single writer), which the
in-memory job transport shares so it never sees uncommitted jobs.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import marshal
from collections.abc import Callable, Sequence
from datetime import datetime
from itertools import islice
from operator import attrgetter
from typing import Any

from treadle.adapters.memory.flow_control import InMemoryFlowControl
from treadle.adapters.memory.retention import InMemoryRetention
from treadle.adapters.run_ends import RunEndCallback, RunEndWatchers
from treadle.kernel.errors import ConcurrencyError, DuplicateError, TreadleError
from treadle.kernel.events import RUN_END_EVENTS, EventBase, OutboxRecord
from treadle.kernel.model import (
    Annotation,
    IdempotencyRecord,
    IdempotencyState,
    JsonValue,
    LogRecord,
    Run,
    RunFilter,
    RunStatus,
    StageRun,
    StageStatus,
    evolve,
)
from treadle.kernel.workflows.model import InboxMessage, JournalEntry, JournalStatus, Timer

_MISSING = object()
# Bound once: an enum member read through its class costs several global reads.
_SUSPENDED = StageStatus.SUSPENDED
_IDEMPOTENCY_COMPLETED = IdempotencyState.COMPLETED


def _idempotency_record(
    stored: IdempotencyRecord | tuple[str, str, datetime, bytes] | None,
) -> IdempotencyRecord | None:
    """The record as the port returns it. A completed record is kept compacted: a tuple
    of strings, a datetime and its JSON result serialised to bytes (the SQL adapters
    keep it as JSON text), so the store holds no container the cyclic garbage collector
    has to walk for it (a thousand runs leave tens of thousands of completed records
    behind). An in-progress mark lives only until its command completes and stays a
    model. ``marshal``, not ``json``: the bytes never leave the process, and it costs a
    seventh of ``json.dumps`` for the per-stage ``job.execute`` result."""
    if stored is None or isinstance(stored, IdempotencyRecord):
        return stored
    key, command_type, started_at, result = stored
    return IdempotencyRecord(
        key=key,
        command_type=command_type,
        state=IdempotencyState.COMPLETED,
        result=marshal.loads(result),
        started_at=started_at,
    )


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

    @property
    def flow(self) -> InMemoryFlowControl:
        """The FlowControl concern (``ports.flow_control``) on this transaction."""
        return InMemoryFlowControl(self._s.runs.values())

    @property
    def retention(self) -> InMemoryRetention:
        """Purging expired runs in this transaction (``adapters/memory/retention.py``)."""
        return InMemoryRetention(self, self._s)

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
    async def insert_run(self, run: Run) -> None:
        self._check()
        s = self._s
        if run.id in s.runs:
            raise DuplicateError(f"run {run.id!r} already exists")
        if run.idempotency_key is not None:
            key = (run.workflow_id, run.idempotency_key)
            if key in s.run_keys:
                raise DuplicateError(
                    f"a {run.workflow_id!r} run with key {run.idempotency_key!r} already exists"
                )
            self.set_item(s.run_keys, key, run.id)
        self.set_item(s.runs, run.id, evolve(run, {"stages": []}))
        self.set_item(s.stages, run.id, {})
        self.set_item(s.event_seq, run.id, 0)

    async def get_run(self, run_id: str, *, for_update: bool = False) -> Run | None:
        return self._s.runs.get(run_id)

    def _rekey(self, stored: Run, run: Run) -> None:
        """An update that changes the run's idempotency key (continue-as-new hands it to
        the new run) moves the (workflow, key) index entry, as the SQL column would."""
        s = self._s
        if run.idempotency_key is not None:
            key = (run.workflow_id, run.idempotency_key)
            if s.run_keys.get(key, run.id) != run.id:
                raise DuplicateError(
                    f"a {run.workflow_id!r} run with key {run.idempotency_key!r} already exists"
                )
        if stored.idempotency_key is not None:
            self.del_item(s.run_keys, (stored.workflow_id, stored.idempotency_key))
        if run.idempotency_key is not None:
            self.set_item(s.run_keys, (run.workflow_id, run.idempotency_key), run.id)

    async def find_run_by_key(self, workflow_id: str, idempotency_key: str) -> Run | None:
        run_id = self._s.run_keys.get((workflow_id, idempotency_key))
        return self._s.runs.get(run_id) if run_id is not None else None

    async def update_run(self, run: Run) -> Run:
        if not self.active:  # _check, inlined here and below: these run on every stage
            self._check()
        stored = self._s.runs.get(run.id)
        if stored is None:
            raise ConcurrencyError(f"run {run.id!r} does not exist")
        if stored.version != run.version:
            raise ConcurrencyError(
                f"run {run.id!r} was updated concurrently (version {stored.version}, "
                f"expected {run.version})"
            )
        if run.idempotency_key != stored.idempotency_key:
            self._rekey(stored, run)
        # A stored run keeps no stages; one read from here has its (empty) list already,
        # and sharing that is what every copy of it does: no new list per update.
        if run.stages:
            new = evolve(run, {"version": run.version + 1, "stages": []})
        else:
            new = evolve(run, {"version": run.version + 1})
        runs = self._s.runs
        self._undo.append((runs, run.id, stored))  # set_item, inlined: once per stage
        runs[run.id] = new
        if new.status.terminal:
            if self.final_runs is None:
                self.final_runs = {}
            self.final_runs[run.id] = new
        return new

    # -- set-oriented forms: every item is checked before any is written, so a failing
    # call applies nothing even if the caller catches the error and goes on.
    async def get_runs(self, run_ids: Sequence[str], *, for_update: bool = False) -> dict[str, Run]:
        runs = self._s.runs
        return {run_id: runs[run_id] for run_id in run_ids if run_id in runs}

    async def update_runs(self, runs: Sequence[Run]) -> list[Run]:
        self._check()
        _reject_duplicates([run.id for run in runs], "run")
        stored = self._s.runs
        stale = [
            repr(run.id)
            for run in runs
            if run.id not in stored or stored[run.id].version != run.version
        ]
        if stale:
            raise ConcurrencyError(
                f"run(s) {', '.join(stale)} were updated concurrently or do not exist"
            )
        return [await self.update_run(run) for run in runs]

    async def insert_runs(self, runs: Sequence[Run]) -> None:
        self._check()
        s = self._s
        ids: set[str] = set()
        keys: set[tuple[str, str]] = set()
        for run in runs:
            if run.id in s.runs or run.id in ids:
                raise DuplicateError(f"run {run.id!r} already exists")
            ids.add(run.id)
            if run.idempotency_key is not None:
                key = (run.workflow_id, run.idempotency_key)
                if key in s.run_keys or key in keys:
                    raise DuplicateError(
                        f"run {run.id!r}: a {run.workflow_id!r} run with key "
                        f"{run.idempotency_key!r} already exists"
                    )
                keys.add(key)
        for run in runs:
            await self.insert_run(run)

    async def find_runs_by_keys(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Run]:
        s = self._s
        found = {key: s.run_keys[key] for key in keys if key in s.run_keys}
        return {key: s.runs[run_id] for key, run_id in found.items()}

    async def list_runs(self, filter: RunFilter) -> list[Run]:
        runs = [r for r in self._s.runs.values() if _matches(r, filter)]
        runs.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return runs[filter.offset : filter.offset + filter.limit]

    async def count_runs(self, group_by: str, filter: RunFilter) -> dict[str, int]:
        if group_by not in ("status", "workflow_id"):
            raise ValueError(f"cannot group runs by {group_by!r}")
        counts: dict[str, int] = {}
        for run in self._s.runs.values():
            if _matches(run, filter):
                key = str(getattr(run, group_by))
                counts[key] = counts.get(key, 0) + 1
        return counts

    async def claim_pending_runs(
        self,
        limit: int,
        *,
        exclude_ids: Sequence[str] = (),
        exclude_keys: Sequence[tuple[str, str | None]] = (),
    ) -> list[Run]:
        pending = [
            r for r in self._s.runs.values() if r.status is RunStatus.PENDING and not r.paused
        ]
        if exclude_ids or exclude_keys:
            ids, keys = set(exclude_ids), set(exclude_keys)
            pending = [
                r
                for r in pending
                if r.id not in ids
                and (r.workflow_id, None) not in keys
                and (r.workflow_id, r.concurrency_key) not in keys
            ]
        pending.sort(key=lambda r: (-r.priority, r.created_at, r.id))
        return pending[:limit]

    async def runs_inactive_since(
        self, status: RunStatus, cutoff: datetime, limit: int
    ) -> list[Run]:
        found = [
            r
            for r in self._s.runs.values()
            if r.status is status and r.updated_at < cutoff and not r.paused  # paused: on purpose
        ]
        found.sort(key=lambda r: (r.updated_at, r.id))
        return found[:limit]

    # -- stages -----------------------------------------------------------------
    async def insert_stages(self, stages: Sequence[StageRun]) -> None:
        self._check()
        for stage in stages:
            per_run = self._s.stages.get(stage.workflow_run_id)
            if per_run is None:
                raise DuplicateError(f"run {stage.workflow_run_id!r} does not exist")
            if stage.stage_id in per_run:
                raise DuplicateError(
                    f"stage {stage.stage_id!r} of run {stage.workflow_run_id!r} already exists"
                )
            self.set_item(per_run, stage.stage_id, stage)
            self._index_suspended(stage)
        for run_id in {stage.workflow_run_id for stage in stages}:
            self._keep_group_order(run_id)

    def _keep_group_order(self, run_id: str) -> None:
        """Keep a run's stages dict in (execution group, insertion) order, so reading
        them needs no sort. run.create inserts in that order already; anything else gets
        a re-ordered copy, whose replacement the undo log reverts like any write."""
        per_run = self._s.stages[run_id]
        groups = [stage.execution_group for stage in per_run.values()]
        if groups != sorted(groups):
            ordered = sorted(per_run.values(), key=_execution_group)  # stable
            self.set_item(self._s.stages, run_id, {st.stage_id: st for st in ordered})

    async def get_stages(self, run_id: str) -> list[StageRun]:
        # Group order, insertion (definition) order within a group; an update keeps a
        # key's position (see _keep_group_order).
        per_run = self._s.stages.get(run_id)
        return list(per_run.values()) if per_run else []

    async def get_stage(self, run_id: str, stage_id: str) -> StageRun | None:
        return self._s.stages.get(run_id, {}).get(stage_id)

    async def update_stage(self, stage: StageRun) -> StageRun:
        if not self.active:
            self._check()
        per_run = self._s.stages.get(stage.workflow_run_id, {})
        stored = per_run.get(stage.stage_id)
        if stored is None or stored.version != stage.version:
            raise ConcurrencyError(
                f"stage {stage.stage_id!r} of run {stage.workflow_run_id!r} was updated "
                "concurrently"
            )
        new = evolve(stage, {"version": stage.version + 1})
        self._undo.append((per_run, stage.stage_id, stored))  # set_item, inlined
        per_run[stage.stage_id] = new
        if new.status is _SUSPENDED or self._s.suspended:
            self._index_suspended(new)
        if new.execution_group != stored.execution_group:
            self._keep_group_order(new.workflow_run_id)
        return new

    async def get_stages_of(self, run_ids: Sequence[str]) -> dict[str, list[StageRun]]:
        return {run_id: await self.get_stages(run_id) for run_id in run_ids}

    async def update_stages(self, stages: Sequence[StageRun]) -> list[StageRun]:
        self._check()
        _reject_duplicates([(s.workflow_run_id, s.stage_id) for s in stages], "stage")
        all_stages = self._s.stages
        stale = []
        for stage in stages:
            stored = all_stages.get(stage.workflow_run_id, {}).get(stage.stage_id)
            if stored is None or stored.version != stage.version:
                stale.append(f"{stage.stage_id!r} of run {stage.workflow_run_id!r}")
        if stale:
            raise ConcurrencyError(
                f"stage(s) {', '.join(stale)} were updated concurrently or do not exist"
            )
        return [await self.update_stage(stage) for stage in stages]

    def _index_suspended(self, stage: StageRun) -> None:
        suspended = self._s.suspended
        if stage.status is _SUSPENDED:
            self.set_item(suspended, (stage.workflow_run_id, stage.stage_id), None)
        elif suspended:  # most updates: nothing suspended, no key to build
            self.del_item(suspended, (stage.workflow_run_id, stage.stage_id))

    async def due_suspended_stages(self, now: datetime, limit: int) -> list[StageRun]:
        due = []
        for run_id, stage_id in self._s.suspended:
            stage = self._s.stages[run_id][stage_id]
            if stage.next_poll_at is not None and stage.next_poll_at <= now:
                due.append(stage)
        due.sort(key=lambda s: (s.next_poll_at or now, s.workflow_run_id, s.stage_id))
        return due[:limit]

    # -- outbox -----------------------------------------------------------------
    async def append_events(self, events: Sequence[EventBase]) -> list[EventBase]:
        if not self.active:
            self._check()
        if not events:
            return []
        s = self._s
        seqs, outbox, unpublished, by_run = s.event_seq, s.outbox, s.unpublished, s.events_by_run
        first_id = s.next_outbox_id + 1
        outbox_id = s.next_outbox_id
        # The sequences before this call, per run, for the undo entry.
        previous: dict[str, int | None] = {}
        buckets: list[list[EventBase]] = []
        stored: list[EventBase] = []
        for event in events:
            run_id = event.workflow_run_id
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
            buckets.append(bucket)
            stored.append(event)
        s.next_outbox_id = outbox_id
        ended = [e.workflow_run_id for e in stored if e.type in RUN_END_EVENTS]  # type: ignore[attr-defined]
        if ended:
            if self.ended_runs is None:
                self.ended_runs = []
            self.ended_runs.extend(ended)
        # One undo entry for the whole call: its outbox ids are fresh and consecutive, so
        # undoing is removing them again and restoring each run's sequence.
        self._undo.append(
            (None, functools.partial(_unappend_events, s, first_id, buckets, previous), None)
        )
        return stored

    async def unpublished_events(self, limit: int) -> list[OutboxRecord]:
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
        self._check()
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

    async def record_publish_failure(
        self, outbox_id: int, error: str, *, dead_letter: bool
    ) -> None:
        self._check()
        record = self._s.outbox_record(outbox_id)
        self.set_item(
            self._s.outbox,
            outbox_id,
            evolve(
                record,
                {
                    "attempts": record.attempts + 1,
                    "last_error": error,
                    "dead_lettered": dead_letter,
                },
            ),
        )
        if dead_letter:
            self.del_item(self._s.unpublished, outbox_id)
            self.set_item(self._s.dead, outbox_id, None)

    async def dead_lettered_events(self, limit: int) -> list[OutboxRecord]:
        return [self._s.outbox_record(i) for i in sorted(self._s.dead)[:limit]]

    async def requeue_dead_letters(self, outbox_ids: Sequence[int]) -> int:
        self._check()
        s = self._s
        revived = [i for i in dict.fromkeys(outbox_ids) if i in s.dead]
        for outbox_id in revived:
            record = s.outbox_record(outbox_id)
            self.set_item(
                s.outbox, outbox_id, evolve(record, {"attempts": 0, "dead_lettered": False})
            )
            self.del_item(s.dead, outbox_id)
            self.set_item(s.unpublished, outbox_id, None)
        if revived:
            # ``unpublished`` is read in insertion order: put the revived rows back at their
            # place (outbox id order), before a run's later events still waiting there.
            # Rolling back only removes them again, which keeps that order.
            _in_id_order(s.unpublished)
        return len(revived)

    async def events_for_run(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        return [e for e in self._s.events_by_run.get(run_id, []) if e.sequence > after_sequence]

    # -- idempotency ------------------------------------------------------------
    async def get_idempotency(self, key: str, command_type: str) -> IdempotencyRecord | None:
        return _idempotency_record(self._s.idempotency.get((key, command_type)))

    async def put_idempotency(self, record: IdempotencyRecord) -> None:
        if not self.active:
            self._check()
        stored: IdempotencyRecord | tuple[str, str, datetime, bytes] = record
        if record.state is _IDEMPOTENCY_COMPLETED:
            result = marshal.dumps(record.result)
            stored = (record.key, record.command_type, record.started_at, result)
        idempotency, key = self._s.idempotency, (record.key, record.command_type)
        self._undo.append((idempotency, key, idempotency.get(key, _MISSING)))  # set_item
        idempotency[key] = stored

    async def put_idempotency_many(self, records: Sequence[IdempotencyRecord]) -> None:
        self._check()
        for record in records:
            await self.put_idempotency(record)

    async def delete_idempotency(self, key: str, command_type: str) -> None:
        self._check()
        self.del_item(self._s.idempotency, (key, command_type))

    # -- logs and annotations -----------------------------------------------------
    async def append_logs(self, logs: Sequence[LogRecord]) -> None:
        self._check()
        for log in logs:
            bucket = self._s.logs.setdefault(log.workflow_run_id, [])
            bucket.append(log)
            self.on_rollback(functools.partial(_drop_last, bucket))

    async def get_logs(self, run_id: str) -> list[LogRecord]:
        return list(self._s.logs.get(run_id, []))

    async def insert_annotations(self, annotations: Sequence[Annotation]) -> None:
        self._check()
        for annotation in annotations:
            bucket = self._s.annotations.setdefault(annotation.workflow_run_id, [])
            if annotation.idempotency_key is not None and any(
                a.idempotency_key == annotation.idempotency_key for a in bucket
            ):
                raise DuplicateError(
                    f"annotation key {annotation.idempotency_key!r} already used on run "
                    f"{annotation.workflow_run_id!r}"
                )
            bucket.append(annotation)
            self.on_rollback(functools.partial(_drop_last, bucket))

    async def find_annotation(self, run_id: str, idempotency_key: str) -> Annotation | None:
        for annotation in self._s.annotations.get(run_id, []):
            if annotation.idempotency_key == idempotency_key:
                return annotation
        return None

    async def list_annotations(
        self,
        run_id: str,
        *,
        key: str | None = None,
        key_prefix: str | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> list[Annotation]:
        out = []
        for annotation in self._s.annotations.get(run_id, []):
            if key is not None and key not in annotation.attributes:
                continue
            if key_prefix is not None and not any(
                k.startswith(key_prefix) for k in annotation.attributes
            ):
                continue
            if scope is not None and annotation.scope != scope:
                continue
            out.append(annotation)
        return out[:limit]

    # -- code workflows: journal, signal inbox, timers ------------------------------------
    # Same undo log as everything above, so a rolled-back transaction leaves no entry,
    # message, consumption or timer behind.
    async def get_journal(
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

    async def get_journal_entry(
        self, run_id: str, name: str, occurrence: int
    ) -> JournalEntry | None:
        position = self._s.journal_keys.get((run_id, name, occurrence))
        return None if position is None else self._s.journal[run_id][position]

    async def latest_journal_entry(self, run_id: str, name: str) -> JournalEntry | None:
        found = [e for e in self._s.journal.get(run_id, {}).values() if e.name == name]
        return max(found, key=lambda e: e.occurrence, default=None)

    async def insert_journal_entry(self, entry: JournalEntry) -> JournalEntry:
        self._check()
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
            self.set_item(s.journal, run_id, per_run)
        s.next_journal_id += 1
        stored = evolve(entry, {"id": s.next_journal_id, "version": 0})
        self.set_item(per_run, entry.position, stored)
        self.set_item(s.journal_keys, key, entry.position)
        order = s.journal_order.setdefault(run_id, [])
        bisect.insort(order, entry.position)
        self.on_rollback(functools.partial(order.remove, entry.position))
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
            self.del_item(s.journal_by_status[(run_id, old)], position)
        bucket = s.journal_by_status.get((run_id, new))
        if bucket is None:
            bucket = {}
            self.set_item(s.journal_by_status, (run_id, new), bucket)
        self.set_item(bucket, position, None)

    async def update_journal_entry(self, entry: JournalEntry) -> JournalEntry:
        self._check()
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
        self.set_item(per_run, entry.position, new)
        self._index_status(entry.workflow_run_id, entry.position, stored.status, new.status)
        return new

    async def insert_signal(self, message: InboxMessage) -> InboxMessage:
        self._check()
        s = self._s
        run_id = message.workflow_run_id
        if message.idempotency_key is not None:
            key = (run_id, message.idempotency_key)
            if key in s.inbox_keys:
                raise DuplicateError(
                    f"run {run_id!r} already received a message with key "
                    f"{message.idempotency_key!r}"
                )
        s.next_inbox_id += 1
        stored = evolve(message, {"id": s.next_inbox_id})
        self.set_item(s.inbox, s.next_inbox_id, stored)
        if message.idempotency_key is not None:
            self.set_item(s.inbox_keys, (run_id, message.idempotency_key), s.next_inbox_id)
        bucket = s.inbox_by_run.setdefault(run_id, [])
        bucket.append(s.next_inbox_id)
        self.on_rollback(functools.partial(_drop_last, bucket))
        if stored.consumed_at is None:
            waiting = (run_id, stored.kind, stored.name)
            self.set_item(s.unconsumed, waiting, (*s.unconsumed.get(waiting, ()), stored.id))
        return stored

    async def next_signal(
        self, run_id: str, name: str, *, kind: str = "signal"
    ) -> InboxMessage | None:
        ids = self._s.unconsumed.get((run_id, kind, name))
        return self._s.inbox[ids[0]] if ids else None

    async def consume_signal(
        self, message_id: int, consumed_at: datetime, consumed_by: str
    ) -> None:
        self._check()
        message = self._s.inbox.get(message_id)
        if message is None or message.consumed_at is not None:
            raise ConcurrencyError(f"inbox message {message_id} was consumed already")
        self.set_item(
            self._s.inbox,
            message_id,
            evolve(message, {"consumed_at": consumed_at, "consumed_by": consumed_by}),
        )
        waiting = (message.workflow_run_id, message.kind, message.name)
        left = tuple(i for i in self._s.unconsumed.get(waiting, ()) if i != message_id)
        if left:
            self.set_item(self._s.unconsumed, waiting, left)
        else:
            self.del_item(self._s.unconsumed, waiting)

    async def list_signals(self, run_id: str) -> list[InboxMessage]:
        return [self._s.inbox[i] for i in self._s.inbox_by_run.get(run_id, [])]

    async def find_update(self, run_id: str, update_id: str) -> InboxMessage | None:
        for message_id in self._s.inbox_by_run.get(run_id, []):
            message = self._s.inbox[message_id]
            if message.kind == "update" and message.update_id == update_id:
                return message
        return None

    async def set_reply(self, message_id: int, reply: JsonValue) -> None:
        self._check()
        message = self._s.inbox.get(message_id)
        if message is None or message.reply is not None:
            raise ConcurrencyError(f"update message {message_id} was answered already")
        self.set_item(self._s.inbox, message_id, evolve(message, {"reply": reply}))

    async def schedule_timer(self, timer: Timer) -> Timer:
        self._check()
        s = self._s
        s.next_timer_id += 1
        stored = evolve(timer, {"id": s.next_timer_id, "fired_at": None})
        key = (timer.workflow_run_id, timer.name, timer.occurrence)
        self.set_item(s.timers, key, stored)
        live = s.live_timers.get(timer.workflow_run_id, ())
        if key not in live:
            self.set_item(s.live_timers, timer.workflow_run_id, (*live, key))
        return stored

    async def pending_timers(self, run_id: str) -> list[Timer]:
        live = [self._s.timers[key] for key in self._s.live_timers.get(run_id, ())]
        return sorted(live, key=lambda t: (t.fire_at, t.id or 0))

    async def due_timers(self, now: datetime, limit: int, *, purpose: str) -> list[Timer]:
        due = [
            t
            for t in self._s.timers.values()
            if t.fired_at is None and t.purpose == purpose and t.fire_at <= now
        ]
        return sorted(due, key=lambda t: (t.fire_at, t.id or 0))[:limit]

    async def fire_timer(self, run_id: str, name: str, occurrence: int, fired_at: datetime) -> bool:
        self._check()
        key = (run_id, name, occurrence)
        timer = self._s.timers.get(key)
        if timer is None or timer.fired_at is not None:
            return False
        self.set_item(self._s.timers, key, evolve(timer, {"fired_at": fired_at}))
        left = tuple(k for k in self._s.live_timers.get(run_id, ()) if k != key)
        if left:
            self.set_item(self._s.live_timers, run_id, left)
        else:
            self.del_item(self._s.live_timers, run_id)
        return True


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
            tx.active = False
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


_execution_group = attrgetter("execution_group")


def _reject_duplicates(keys: Sequence[Any], what: str) -> None:
    """``ValueError`` if a key occurs twice: the second update of one call would always
    be stale, a caller's bug rather than a concurrent writer."""
    seen: set[Any] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"{what} {key!r} occurs more than once in one call")
        seen.add(key)


def _drop_last(bucket: list[Any]) -> None:
    bucket.pop()


def _unappend_events(
    store: InMemoryPersistence,
    first_id: int,
    buckets: list[list[Any]],
    previous: dict[str, int | None],
) -> None:
    for outbox_id in range(first_id, first_id + len(buckets)):
        store.outbox.pop(outbox_id, None)
        store.unpublished.pop(outbox_id, None)
    for bucket in reversed(buckets):
        bucket.pop()
    for run_id, seq in previous.items():
        if seq is None:
            store.event_seq.pop(run_id, None)
        else:
            store.event_seq[run_id] = seq


def _unpublish(
    store: InMemoryPersistence, removed: list[tuple[int, OutboxRecord | EventBase, bool, bool]]
) -> None:
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


def _in_id_order(index: dict[int, Any]) -> None:
    ordered = sorted(index.items())
    index.clear()
    index.update(ordered)


def _matches(run: Run, f: RunFilter) -> bool:
    if f.status is not None and run.status is not f.status:
        return False
    if f.statuses and run.status not in f.statuses:
        return False
    if f.workflow_id is not None and run.workflow_id != f.workflow_id:
        return False
    if f.created_after is not None and run.created_at < f.created_after:
        return False
    if f.created_before is not None and run.created_at >= f.created_before:
        return False
    if f.parent_run_id is not None and run.parent_run_id != f.parent_run_id:
        return False
    if f.paused is not None and (run.paused and not run.status.terminal) is not f.paused:
        return False
    return all(
        k in run.search_attributes and _json_equal(run.search_attributes[k], v)
        for k, v in f.attributes.items()
    )


def _json_equal(stored: Any, wanted: Any) -> bool:
    """Equality of JSON values as the SQL adapters compare them: ``True`` is not ``1``
    (Python says it is), numbers compare by value, objects by content."""
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return type(stored) is type(wanted) and stored == wanted
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return stored.keys() == wanted.keys() and all(
            _json_equal(stored[k], wanted[k]) for k in stored
        )
    if isinstance(stored, list | tuple) and isinstance(wanted, list | tuple):
        return len(stored) == len(wanted) and all(map(_json_equal, stored, wanted))
    return bool(stored == wanted)


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

    def transaction(self) -> _TransactionScope:
        return _TransactionScope(self)

    def watch_run_ends(self, callback: RunEndCallback) -> Callable[[], None]:
        """Call ``callback(run_ids, outcomes)`` after each commit that finished runs (see
        ``adapters.run_ends``); returns the function that stops it."""
        return self.run_ends.watch(callback)

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
