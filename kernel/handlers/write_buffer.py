"""``WriteBuffer``: one transaction's reads served from a prefetch, its writes collected.

A group commit (``kernel/group_commit.py``) runs the ordinary per-stage commit logic of
``job.execute`` once per item, against this buffer instead of the real transaction. The
reads that logic makes (job, run, stages) were fetched for the whole group up front with
one statement each; the writes it makes are collected and then flushed with one
set-oriented statement per kind (``stages.update_many``, ``runs.update_many``, ``complete_many``,
``enqueue``, ``outbox.append``, ``idempotency.put_many``). Items see each other's writes,
as consecutive statements of one transaction would.

The buffer carries only what the hot path does. Anything else (a failure with retry, a
log line, a child run reporting to its parent, a row written twice in one group) raises
``NotBatchableError``: the caller rolls the group back and commits each item alone, through
the real transaction, so nothing changes meaning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from treadle.kernel.events import EventBase
from treadle.kernel.handlers.buffered_stores import (
    BufferedIdempotency,
    BufferedOutbox,
    BufferedRuns,
    BufferedStages,
    NotBatchableError,
)
from treadle.kernel.model import IdempotencyRecord, Job, JobStatus, Run, StageRun, evolve

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps
    from treadle.ports import JobTransport, Transaction
    from treadle.ports.ai_calls import AICallLogger
    from treadle.ports.flow_control import FlowControl
    from treadle.ports.persistence import (
        AnnotationStore,
        InboxStore,
        JournalStore,
        LogStore,
        TimerStore,
    )
    from treadle.ports.retention import RetentionStore
    from treadle.ports.schedules import ScheduleStore

__all__ = ["BUFFERED_JOBS", "BufferedJobs", "NotBatchableError", "WriteBuffer"]


class WriteBuffer:
    """A ``Transaction`` whose runs, stages, outbox and idempotency stores serve the
    prefetch and collect the writes (``buffered_stores``); its other concerns refuse the
    item. Through ``BUFFERED_JOBS`` it also stands in for the ``JobTransport``."""

    def __init__(
        self,
        tx: Transaction,
        runs: dict[str, Run],
        stages: dict[str, list[StageRun]],
        jobs: dict[str, Job | None],
    ) -> None:
        """``runs``/``stages``/``jobs``: the prefetch, by id; every id the group asked
        for is a key of ``stages`` and ``jobs`` (``[]``/``None`` when not found)."""
        self.tx = tx
        self.prefetched_runs = runs
        self.prior_runs = dict(runs)
        """The runs as prefetched (``prefetched_runs`` takes each one's written state):
        what each write replaces, so the flush may write only what changed."""
        self.prior_stages = {
            (stage.workflow_run_id, stage.stage_id): stage
            for run_stages in stages.values()
            for stage in run_stages
        }
        """The stages as prefetched, by (run id, stage id), as ``prior_runs``."""
        self.prefetched_stages = stages
        self.job_rows = jobs
        self.run_writes: dict[str, Run] = {}
        """Run id -> the run as written, with the version it expects to replace."""
        self.stage_writes: dict[tuple[str, str], StageRun] = {}
        self.events: list[EventBase] = []
        self.idempotency_writes: list[IdempotencyRecord] = []
        self.completed_jobs: list[str] = []
        self.leases: dict[str, tuple[str, int]] | None = None
        """With ``guard_jobs``: each completed job's lease as prefetched (worker,
        attempts), which the flush's completion requires still to hold."""
        self.new_jobs: list[Job] = []
        self.runs = BufferedRuns(self)
        self.stages = BufferedStages(self)
        self.outbox = BufferedOutbox(self)
        self.idempotency = BufferedIdempotency(self)

    def guard_jobs(self) -> None:
        """Complete jobs only if still leased as prefetched (a commit that takes its
        prefetch from memory instead of reading it in this transaction)."""
        self.leases = {}

    def stand_in(self, deps: Deps) -> tuple[Deps, WriteBuffer]:
        """``deps`` with the buffered job transport, and this buffer as the transaction:
        what the per-item commit logic runs against instead of the real ones. The job
        transport finds the buffer in the transaction it is handed, so one stand-in
        ``Deps`` per kernel serves every buffer (made once, kept on ``deps``): a commit
        allocates no ``Deps`` copy and no reference cycle for the collector."""
        stand_in = deps.__dict__.get("_buffered_deps")
        if stand_in is None:
            stand_in = replace(deps, job_transport=BUFFERED_JOBS)
            deps.__dict__["_buffered_deps"] = stand_in
        return stand_in, self

    # -- the concerns a group commit does not carry -----------------------------------
    # Reading one refuses the item (``NotBatchableError``): it commits alone, through the
    # real transaction. Each is typed as its port, so callers type-check as against a
    # ``Transaction``; nothing is forwarded by name.
    @property
    def annotations(self) -> AnnotationStore:
        raise _not_carried("annotations")

    @property
    def logs(self) -> LogStore:
        raise _not_carried("logs")

    @property
    def journal(self) -> JournalStore:
        raise _not_carried("journal")

    @property
    def inbox(self) -> InboxStore:
        raise _not_carried("inbox")

    @property
    def timers(self) -> TimerStore:
        raise _not_carried("timers")

    @property
    def flow(self) -> FlowControl:
        raise _not_carried("flow")

    @property
    def retention(self) -> RetentionStore:
        raise _not_carried("retention")

    @property
    def schedules(self) -> ScheduleStore:
        raise _not_carried("schedules")

    @property
    def ai_calls(self) -> AICallLogger:
        raise _not_carried("ai_calls")

    def written_state(self, run_id: str) -> tuple[Run, list[StageRun]]:
        """The run and its stages as the collected writes leave them (for rows not
        stored yet, which the caller inserts in that state instead of updating)."""
        run = self.prefetched_runs[run_id]
        stages = self.prefetched_stages[run_id]
        return run, list(stages)

    # -- the flush ----------------------------------------------------------------
    async def flush(self, transport: JobTransport, *, last: bool = False) -> None:
        """Write everything collected, one statement per kind. The runs go first: their
        update takes (or, after a prefetch ``for_update``, already holds) each run's row
        lock and checks its version, as every writer of a run does before touching its
        jobs and stages. New jobs go before the stages (a stage row names its job).

        A transaction with the ``write_set`` capability (``ports/persistence/
        write_set.py``; PostgreSQL sends it as one statement) takes all but the
        idempotency records together, in that order and with the same guards.
        ``last``: the caller writes nothing after this in its transaction (the adapter
        may then commit the set as it sends it: ``write_set``'s ``last``)."""
        tx = self.tx
        write_set = getattr(tx, "write_set", None)
        if write_set is not None and await write_set(
            transport,
            runs=list(self.run_writes.values()),
            new_jobs=self.new_jobs,
            completed_jobs=self.completed_jobs,
            leases=self.leases,
            stages=list(self.stage_writes.values()),
            events=self.events,
            last=last and not self.idempotency_writes,
            prior=self.prior_runs,
            prior_stages=self.prior_stages,
        ):
            if self.idempotency_writes:
                await tx.idempotency.put_many(self.idempotency_writes)
            return
        if self.run_writes:
            await tx.runs.update_many(list(self.run_writes.values()))
        if self.new_jobs:
            await transport.enqueue(tx, self.new_jobs)
        if self.completed_jobs:
            await transport.complete_many(tx, self.completed_jobs, leases=self.leases)
        if self.stage_writes:
            await tx.stages.update_many(list(self.stage_writes.values()))
        if self.events:
            await tx.outbox.append(self.events)
        if self.idempotency_writes:
            await tx.idempotency.put_many(self.idempotency_writes)


class BufferedJobs:
    """The ``JobTransport`` calls of the hot path, served by the ``WriteBuffer`` each
    call is handed as its transaction (stateless: one instance serves all buffers)."""

    async def get(self, tx: Any, job_id: str) -> Job | None:
        jobs = _buffer(tx).job_rows
        if job_id not in jobs:
            raise NotBatchableError(f"job {job_id!r} was not prefetched")
        return jobs[job_id]

    async def complete(self, tx: Any, job_id: str) -> None:
        buffer = _buffer(tx)
        job = buffer.job_rows.get(job_id)
        if job is None or job_id in buffer.completed_jobs:
            raise NotBatchableError(f"job {job_id!r} not prefetched or completed twice")
        if buffer.leases is not None:
            if job.worker_id is None:
                raise NotBatchableError(f"job {job_id!r} is not leased")
            buffer.leases[job_id] = (job.worker_id, job.attempts)
        buffer.completed_jobs.append(job_id)
        buffer.job_rows[job_id] = evolve(job, {"status": JobStatus.COMPLETED, "worker_id": None})

    async def enqueue(self, tx: Any, jobs: Sequence[Job]) -> None:
        buffer = _buffer(tx)
        buffer.new_jobs.extend(jobs)
        for job in jobs:
            buffer.job_rows[job.id] = job

    # -- the rest of the port refuses the item (it commits alone) -------------------
    async def dequeue(
        self,
        worker_id: str,
        now: datetime,
        *,
        limit: int = 1,
        queues: Sequence[str] | None = None,
        stage_ids: Sequence[str] | None = None,
    ) -> list[Job]:
        raise _refused_job("dequeue")

    async def get_many(self, tx: Any, job_ids: Sequence[str]) -> dict[str, Job]:
        raise _refused_job("get_many")

    async def complete_many(
        self,
        tx: Any,
        job_ids: Sequence[str],
        *,
        leases: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        raise _refused_job("complete_many")

    async def suspend(self, tx: Any, job_id: str, next_poll_at: datetime) -> None:
        raise _refused_job("suspend")

    async def requeue(
        self,
        tx: Any,
        job_id: str,
        available_at: datetime,
        *,
        error: str | None = None,
        refund_attempt: bool = False,
    ) -> None:
        raise _refused_job("requeue")

    async def fail(self, tx: Any, job_id: str, error: str) -> None:
        raise _refused_job("fail")

    async def cancel_by_run(self, tx: Any, run_id: str) -> int:
        raise _refused_job("cancel_by_run")

    async def live_jobs(self, tx: Any, run_id: str) -> list[Job]:
        raise _refused_job("live_jobs")

    async def extend_lease(self, job_id: str, worker_id: str, now: datetime) -> bool:
        raise _refused_job("extend_lease")

    async def stale_leases(self, tx: Any, older_than: datetime, *, limit: int = 100) -> list[Job]:
        raise _refused_job("stale_leases")

    async def next_due_at(self) -> datetime | None:
        raise _refused_job("next_due_at")


def _refused_job(name: str) -> NotBatchableError:
    return NotBatchableError(f"JobTransport.{name} is not carried by a group commit")


def _not_carried(concern: str) -> NotBatchableError:
    return NotBatchableError(f"Transaction.{concern} is not carried by a group commit")


def _buffer(tx: Any) -> WriteBuffer:
    if not isinstance(tx, WriteBuffer):
        raise NotBatchableError("a buffered job call outside a WriteBuffer")
    return tx


BUFFERED_JOBS = BufferedJobs()
