"""The stores a ``WriteBuffer`` exposes as its ``runs``, ``stages``, ``outbox`` and
``idempotency``: each implements its whole port (``RunStore``, ``StageStore``, ...), the
reads of the hot path from the group's prefetch, its writes collected on the buffer.

Every other method of those ports is written out and refuses the item with
``NotBatchableError`` (the group rolls back and the item commits alone through the real
transaction), so a type checker sees exactly what a group commit carries and a new port
method cannot slip through a name-forwarding fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from treadle.kernel.events import EventBase, OutboxRecord
from treadle.kernel.model import IdempotencyRecord, Run, RunFilter, RunStatus, StageRun, evolve


class NotBatchableError(Exception):
    """The item needs an operation the buffer does not carry; commit it alone."""


class WriteBuffer(Protocol):
    """What the stores use of ``write_buffer.WriteBuffer`` (stated here, so this module
    imports nothing of the module that imports it)."""

    prefetched_runs: dict[str, Run]
    prefetched_stages: dict[str, list[StageRun]]
    run_writes: dict[str, Run]
    stage_writes: dict[tuple[str, str], StageRun]
    events: list[EventBase]
    idempotency_writes: list[IdempotencyRecord]


def _refuse(what: str) -> NotBatchableError:
    return NotBatchableError(f"Transaction.{what} is not carried by a group commit")


class BufferedRuns:
    """``tx.runs`` of a group commit: ``get`` from the prefetch, ``update`` collected."""

    __slots__ = ("_runs", "_stages", "_writes")

    def __init__(self, buffer: WriteBuffer) -> None:
        # The buffer's containers, not the buffer: no reference cycle for the collector.
        self._runs = buffer.prefetched_runs
        self._stages = buffer.prefetched_stages
        self._writes = buffer.run_writes

    async def get(self, run_id: str, *, for_update: bool = False) -> Run | None:
        if run_id not in self._stages:  # not among the group's prefetched runs
            raise NotBatchableError(f"run {run_id!r} was not prefetched")
        return self._runs.get(run_id)

    async def update(self, run: Run) -> Run:
        stored = self._runs.get(run.id)
        if run.id in self._writes or stored is None or stored.version != run.version:
            raise NotBatchableError(f"run {run.id!r} written twice or concurrently")
        self._writes[run.id] = run
        new = evolve(run, {"version": run.version + 1, "stages": []})
        self._runs[run.id] = new
        return new

    async def insert(self, run: Run) -> None:
        raise _refuse("runs.insert")

    async def find_by_key(self, workflow_id: str, idempotency_key: str) -> Run | None:
        raise _refuse("runs.find_by_key")

    async def query(self, filter: RunFilter) -> list[Run]:
        raise _refuse("runs.query")

    async def count(self, group_by: str, filter: RunFilter) -> dict[str, int]:
        raise _refuse("runs.count")

    async def claim_pending(
        self,
        limit: int,
        *,
        exclude_ids: Sequence[str] = (),
        exclude_keys: Sequence[tuple[str, str | None]] = (),
    ) -> list[Run]:
        raise _refuse("runs.claim_pending")

    async def inactive_since(self, status: RunStatus, cutoff: datetime, limit: int) -> list[Run]:
        raise _refuse("runs.inactive_since")

    async def get_many(self, run_ids: Sequence[str], *, for_update: bool = False) -> dict[str, Run]:
        raise _refuse("runs.get_many")

    async def update_many(self, runs: Sequence[Run]) -> list[Run]:
        raise _refuse("runs.update_many")

    async def insert_many(self, runs: Sequence[Run]) -> None:
        raise _refuse("runs.insert_many")

    async def find_by_keys(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Run]:
        raise _refuse("runs.find_by_keys")


class BufferedStages:
    """``tx.stages`` of a group commit: ``for_run`` from the prefetch, ``update`` collected."""

    __slots__ = ("_stages", "_writes")

    def __init__(self, buffer: WriteBuffer) -> None:
        self._stages = buffer.prefetched_stages
        self._writes = buffer.stage_writes

    async def for_run(self, run_id: str) -> list[StageRun]:
        stages = self._stages.get(run_id)
        if stages is None:
            raise NotBatchableError(f"stages of run {run_id!r} were not prefetched")
        return list(stages)

    async def update(self, stage: StageRun) -> StageRun:
        key = (stage.workflow_run_id, stage.stage_id)
        stages = self._stages.get(stage.workflow_run_id)
        index = next((i for i, st in enumerate(stages or ()) if st.stage_id == stage.stage_id), -1)
        if key in self._writes or stages is None or index < 0:
            raise NotBatchableError(f"stage {key!r} written twice or not prefetched")
        if stages[index].version != stage.version:
            raise NotBatchableError(f"stage {key!r} was updated concurrently")
        self._writes[key] = stage
        new = evolve(stage, {"version": stage.version + 1})
        stages[index] = new
        return new

    async def insert_many(self, stages: Sequence[StageRun]) -> None:
        raise _refuse("stages.insert_many")

    async def get(self, run_id: str, stage_id: str) -> StageRun | None:
        raise _refuse("stages.get")

    async def for_runs(self, run_ids: Sequence[str]) -> dict[str, list[StageRun]]:
        raise _refuse("stages.for_runs")

    async def update_many(self, stages: Sequence[StageRun]) -> list[StageRun]:
        raise _refuse("stages.update_many")

    async def due_suspended(self, now: datetime, limit: int) -> list[StageRun]:
        raise _refuse("stages.due_suspended")


class BufferedOutbox:
    """``tx.outbox`` of a group commit: ``append`` collected (sequences are assigned by
    the flush's one append; no caller reads them here)."""

    __slots__ = ("_events",)

    def __init__(self, buffer: WriteBuffer) -> None:
        self._events = buffer.events

    async def append(self, events: Sequence[EventBase]) -> list[EventBase]:
        self._events.extend(events)
        return list(events)

    async def unpublished(self, limit: int) -> list[OutboxRecord]:
        raise _refuse("outbox.unpublished")

    async def mark_published(self, outbox_ids: Sequence[int]) -> None:
        raise _refuse("outbox.mark_published")

    async def record_failure(
        self, outbox_id: int, error: str, *, dead_letter: bool, retry_at: datetime | None = None
    ) -> None:
        raise _refuse("outbox.record_failure")

    async def dead_lettered(self, limit: int) -> list[OutboxRecord]:
        raise _refuse("outbox.dead_lettered")

    async def requeue_dead_letters(self, outbox_ids: Sequence[int]) -> int:
        raise _refuse("outbox.requeue_dead_letters")

    async def events_for_run(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        raise _refuse("outbox.events_for_run")

    async def events_after(self, after_id: int, limit: int) -> list[tuple[int, EventBase]]:
        raise _refuse("outbox.events_after")

    async def last_event_id(self) -> int:
        raise _refuse("outbox.last_event_id")


class BufferedIdempotency:
    """``tx.idempotency`` of a group commit: ``put`` collected."""

    __slots__ = ("_records",)

    def __init__(self, buffer: WriteBuffer) -> None:
        self._records = buffer.idempotency_writes

    async def put(self, record: IdempotencyRecord) -> None:
        self._records.append(record)

    async def get(self, key: str, command_type: str) -> IdempotencyRecord | None:
        raise _refuse("idempotency.get")

    async def put_many(self, records: Sequence[IdempotencyRecord]) -> None:
        raise _refuse("idempotency.put_many")

    async def delete(self, key: str, command_type: str) -> None:
        raise _refuse("idempotency.delete")
