"""Runs in the in-memory adapter: the ``Runs`` concern of one
``InMemoryTransaction``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from treadle.adapters.memory.persistence.shared import MemoryUnit, _json_equal, _reject_duplicates
from treadle.kernel.errors import ConcurrencyError, DuplicateError
from treadle.kernel.model import (
    Run,
    RunFilter,
    RunStatus,
    evolve,
)

_TERMINAL = frozenset(status for status in RunStatus if status.terminal)


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
    if f.updated_after is not None and run.updated_at < f.updated_after:
        return False
    if f.updated_before is not None and run.updated_at >= f.updated_before:
        return False
    if f.after is not None and (run.created_at, run.id) >= f.after:
        return False
    if f.parent_run_id is not None and run.parent_run_id != f.parent_run_id:
        return False
    if f.paused is not None and (run.paused and not run.status.terminal) is not f.paused:
        return False
    return all(
        k in run.search_attributes and _json_equal(run.search_attributes[k], v)
        for k, v in f.attributes.items()
    )


class MemoryRuns:
    """Runs on this transaction's store (``tx.runs``, the ``RunStore`` port)."""

    __slots__ = ("_s", "_tx", "_undo")

    def __init__(self, tx: MemoryUnit) -> None:
        self._tx = tx
        self._s = tx._s
        self._undo = tx._undo

    async def insert(self, run: Run) -> None:
        self._tx._check()
        s = self._s
        if run.id in s.runs:
            raise DuplicateError(f"run {run.id!r} already exists")
        if run.idempotency_key is not None:
            key = (run.workflow_id, run.idempotency_key)
            if key in s.run_keys:
                raise DuplicateError(
                    f"a {run.workflow_id!r} run with key {run.idempotency_key!r} already exists"
                )
            self._tx.set_item(s.run_keys, key, run.id)
        self._tx.set_item(s.runs, run.id, evolve(run, {"stages": []}))
        self._tx.set_item(s.stages, run.id, {})
        self._tx.set_item(s.event_seq, run.id, 0)

    async def get(self, run_id: str, *, for_update: bool = False) -> Run | None:
        found: Run | None = self._s.runs.get(run_id)
        return found

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
            self._tx.del_item(s.run_keys, (stored.workflow_id, stored.idempotency_key))
        if run.idempotency_key is not None:
            self._tx.set_item(s.run_keys, (run.workflow_id, run.idempotency_key), run.id)

    async def find_by_key(self, workflow_id: str, idempotency_key: str) -> Run | None:
        run_id = self._s.run_keys.get((workflow_id, idempotency_key))
        return self._s.runs.get(run_id) if run_id is not None else None

    async def update(self, run: Run) -> Run:
        if not self._tx.active:  # _check, inlined here and below: these run on every stage
            self._tx._check()
        # The fields through the models' ``__dict__``: one read through pydantic's
        # ``__getattr__`` hook each rather than one per field.
        fields = run.__dict__
        run_id, version = fields["id"], fields["version"]
        runs = self._s.runs
        stored = runs.get(run_id)
        if stored is None:
            raise ConcurrencyError(f"run {run_id!r} does not exist")
        was = stored.__dict__
        if was["version"] != version:
            raise ConcurrencyError(
                f"run {run_id!r} was updated concurrently (version {was['version']}, "
                f"expected {version})"
            )
        if fields["idempotency_key"] != was["idempotency_key"]:
            self._rekey(stored, run)
        # A stored run keeps no stages; one read from here has its (empty) list already,
        # and sharing that is what every copy of it does: no new list per update.
        if fields["stages"]:
            new = evolve(run, {"version": version + 1, "stages": []})
        else:
            new = evolve(run, {"version": version + 1})
        self._undo.append((runs, run_id, stored))  # set_item, inlined: once per stage
        runs[run_id] = new
        if fields["status"] in _TERMINAL:
            if self._tx.final_runs is None:
                self._tx.final_runs = {}
            self._tx.final_runs[run.id] = new
        return new

    async def get_many(self, run_ids: Sequence[str], *, for_update: bool = False) -> dict[str, Run]:
        runs = self._s.runs
        return {run_id: runs[run_id] for run_id in run_ids if run_id in runs}

    async def update_many(self, runs: Sequence[Run]) -> list[Run]:
        self._tx._check()
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
        return [await self.update(run) for run in runs]

    async def insert_many(self, runs: Sequence[Run]) -> None:
        self._tx._check()
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
            await self.insert(run)

    async def find_by_keys(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Run]:
        s = self._s
        found = {key: s.run_keys[key] for key in keys if key in s.run_keys}
        return {key: s.runs[run_id] for key, run_id in found.items()}

    async def query(self, filter: RunFilter) -> list[Run]:
        runs = [r for r in self._s.runs.values() if _matches(r, filter)]
        runs.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        page = runs[filter.offset : filter.offset + filter.limit]
        if not filter.payloads:
            page = [evolve(r, {"input": None, "output": None}) for r in page]
        return page

    async def count(self, group_by: str, filter: RunFilter) -> dict[str, int]:
        if group_by not in ("status", "workflow_id"):
            raise ValueError(f"cannot group runs by {group_by!r}")
        counts: dict[str, int] = {}
        for run in self._s.runs.values():
            if _matches(run, filter):
                key = str(getattr(run, group_by))
                counts[key] = counts.get(key, 0) + 1
        return counts

    async def claim_pending(
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

    async def inactive_since(self, status: RunStatus, cutoff: datetime, limit: int) -> list[Run]:
        found = [
            r
            for r in self._s.runs.values()
            if r.status is status and r.updated_at < cutoff and not r.paused  # paused: on purpose
        ]
        found.sort(key=lambda r: (r.updated_at, r.id))
        return found[:limit]
