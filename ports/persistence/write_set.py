"""An optional capability of a ``Transaction``: a hot-path commit's writes as one unit.

A completed stage's result commit (``kernel/handlers/write_buffer.py``) writes runs,
new jobs, completed jobs, stages and events, each guarded by what it expects to
replace. ``write_set`` takes them together, so an adapter that can may send them as
one statement (PostgreSQL: data-modifying CTEs of one ``WITH ... SELECT``) instead of
one per kind. A transaction without the attribute, or whose ``write_set`` returns
``False``, gets the per-kind calls (``runs.update_many``, ``transport.enqueue``,
``transport.complete_many``, ``stages.update_many``, ``outbox.append``) from the
caller, which therefore never depends on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from treadle.kernel.events import EventBase
    from treadle.kernel.model import Job, Run, StageRun
    from treadle.ports.job_transport import JobTransport

__all__ = ["InsertSetStore", "WriteSetStore"]


class WriteSetStore(Protocol):
    """``tx.write_set(...)``: the adapter's one-unit form of the hot path's writes."""

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
        """Write all of these in this transaction with exactly the effects and guards of
        the per-kind calls, in their order (runs, new jobs, completed jobs, stages,
        events): ``runs`` and ``stages`` updated as ``update_many`` does (each must
        still have its version), ``new_jobs`` enqueued through ``transport``,
        ``completed_jobs`` completed as ``complete_many(..., leases=leases)`` does,
        ``events`` appended and numbered. A failed guard raises what the per-kind call
        would (``ConcurrencyError``; ``DuplicateError`` for a job id taken;
        ``JobNotFoundError`` may read as ``ConcurrencyError``) and the caller rolls
        back. Returns ``False``, having written nothing, when it cannot take this set
        in one unit (the caller then makes the per-kind calls).

        ``last``: the caller writes nothing else in this transaction. An adapter may then
        commit the set by itself when it is the whole transaction (PostgreSQL: the one
        statement without ``BEGIN``/``COMMIT``); the transaction then refuses further
        use, as one that has ended.

        ``prior``: run id -> the run as stored, the version each of ``runs`` replaces
        (which the version check proves is what the row holds). An adapter may then
        write only the columns that differ; without it, every column. ``prior_stages``:
        the same for ``stages``, by (run id, stage id)."""
        ...


class InsertSetStore(Protocol):
    """``tx.insert_set(...)``: the adapter's one-unit form of a start's inserts."""

    async def insert_set(
        self,
        transport: JobTransport,
        *,
        runs: Sequence[Run],
        new_jobs: Sequence[Job],
        stages: Sequence[StageRun],
        events: Sequence[EventBase],
        last: bool = False,
    ) -> bool:
        """Insert all of these in this transaction with exactly the effects of the
        per-kind calls in their order (``runs.insert_many``, ``transport.enqueue``,
        ``stages.insert_many``, ``outbox.append``); ``stages`` only of these ``runs``.
        A run whose id or idempotency key is taken raises ``DuplicateError`` (as does a
        job id taken) and the caller rolls back. Returns ``False``, having written
        nothing, when it cannot take this set in one unit (the caller then makes the
        per-kind calls). ``last``: as ``WriteSetStore.write_set``'s."""
        ...
