"""One activation of a code workflow: the code-workflow branch of ``job.execute``.

``job.execute`` commits the orchestrating stage RUNNING as for any stage (phase 1);
then, outside any transaction, the body runs from the top over the run's journal
(phase 2), committing each new step result in a short transaction of its own that
first checks this execution still owns the run (the job is leased by this worker
for this attempt, the run is not cancelled): a ghost's step result is never
recorded. Phase 3 commits how the activation ended:

* the body returned: the stage and the run complete with its output;
* the body raised (or was not deterministic): the run fails with that error, after
  the compensations it registered ran (``saga``);
* the body called ``ctx.continue_as_new``: the run completes and a new run of the
  workflow goes on in the same transaction (``kernel.workflows.continuation``);
* the body waits (sleep, signal, retry backoff): the journal records the wait, a
  timer is scheduled, the job completes and the stage is SUSPENDED with
  ``next_poll_at`` at its earliest timer, so no worker is held; a short backoff
  instead re-queues a new activation job that starts after the delay.

Each activation gets a new job, so a job's attempts count crashes of one
activation (``ACTIVATION_RETRY``), not the waits of a long-lived run. A cancelled
run's compensating activation (``saga.compensate_on_cancel``) only replays the body to
re-register its compensations and runs them (``_finish_compensating``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pydantic import ValidationError as PydanticValidationError

import treadle.kernel.commands as c
from treadle.kernel.ai import AICall, marked_failed
from treadle.kernel.context import CancellationToken
from treadle.kernel.errors import (
    ConcurrencyError,
    DuplicateError,
    InvalidInputError,
    OutputValidationError,
    PayloadMissingError,
    VersionMismatchError,
    as_body_failure,
    describe_exception,
    short_traceback,
)
from treadle.kernel.events import EventBase, ReviewRequested, StageCompleted
from treadle.kernel.handlers.common import (
    apply_transition,
    fail_run,
    fail_stage_for_good,
)
from treadle.kernel.handlers.effects import read_ai_totals
from treadle.kernel.handlers.execution import Started, is_current, validate_output
from treadle.kernel.handlers.write_buffer import NotBatchableError, WriteBuffer
from treadle.kernel.model import (
    JsonValue,
    MissingPayload,
    Run,
    RunStatus,
    StageRun,
    StageStatus,
    evolve,
)
from treadle.kernel.workflows.activation import apply_attributes, enqueue_activation, write_entries
from treadle.kernel.workflows.children import cancel_run, start_child
from treadle.kernel.workflows.context import WorkflowContext, message_result
from treadle.kernel.workflows.continuation import continue_run
from treadle.kernel.workflows.deadline import forward_timers
from treadle.kernel.workflows.definition import WORKFLOW_STAGE_ID, CodeWorkflowDefinition
from treadle.kernel.workflows.model import (
    ChildStart,
    InboxMessage,
    JournalEntry,
    JournalOwner,
    JournalStatus,
    Timer,
)
from treadle.kernel.workflows.saga import SagaOutcome, adopt_registrations, run_compensations
from treadle.kernel.workflows.sticky import Body, Parked, reusable
from treadle.kernel.workflows.versions import block, mismatch_event, version_mismatch
from treadle.kernel.workflows.waits import Interrupt, Wait, describe_waits

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps, Scope
    from treadle.ports import AttemptSpan, Transaction


# -- the activation -----------------------------------------------------------------------
class _GuardFailedError(Exception):
    """A commit without reads found the run, stage or job moved on; nothing was written."""


class _Writer:
    """The ``JournalWriter`` of one activation: every commit re-checks ownership."""

    def __init__(
        self,
        deps: Deps,
        scope: Scope,
        started: Started,
        worker_id: str,
        span: AttemptSpan | None = None,
    ) -> None:
        self._deps = deps
        self._scope = scope
        self._s = started
        self._worker_id = worker_id
        self.paused = False
        self.span = span

    async def owner(self, tx: Transaction) -> tuple[Run, StageRun] | None:
        """The run (locked) and stage if this execution still owns them, else ``None``.
        The run row is locked first, as ``run.signal`` does, so the two serialise."""
        owned = getattr(self._deps.job_transport, "get_owned", None)
        if owned is not None:  # the three reads below in one round trip (SQL)
            run, stage, job = await owned(tx, self._s.job.id, self._s.run.id, WORKFLOW_STAGE_ID)
        else:
            run = await tx.runs.get(self._s.run.id, for_update=True)
            job = await self._deps.job_transport.get(tx, self._s.job.id)
            stage = await tx.stages.get(self._s.run.id, WORKFLOW_STAGE_ID)
        if not is_current(job, stage, run, self._s, self._worker_id):
            return None
        assert run is not None
        assert stage is not None
        return run, stage

    async def commit(
        self,
        entries: Sequence[JournalEntry],
        events: Sequence[EventBase],
        *,
        consume: Sequence[tuple[int, str]] = (),
        replies: Sequence[tuple[int, JsonValue]] = (),
        start_children: Sequence[ChildStart] = (),
        cancel_children: Sequence[str] = (),
        ai_calls: Sequence[AICall] = (),
    ) -> list[JournalEntry]:
        now = self._deps.clock.now()
        causation = self._scope.causation_id
        plain = not (consume or replies or start_children or cancel_children or ai_calls)
        if plain and entries and all(e.id is None and e.kind != "attribute" for e in entries):
            # New entries only, nothing that changes the run: the commit without reads.
            try:
                async with self._deps.persistence.transaction() as tx:
                    appended = await self._append(tx, entries, events, causation)
                    if appended is not None:
                        return appended
                    stored = await self._commit_in(tx, now, entries, events)  # not offered
            except _GuardFailedError as failed:  # nothing written: read and decide
                self._deps.logger.debug(
                    "workflow.append_fallback", run_id=self._s.run.id, reason=failed.__cause__
                )
            else:
                if stored is None:
                    raise Interrupt("ghost")
                return stored
        async with self._deps.persistence.transaction() as tx:
            stored = await self._commit_in(
                tx,
                now,
                entries,
                events,
                consume=consume,
                replies=replies,
                start_children=start_children,
                cancel_children=cancel_children,
                ai_calls=ai_calls,
            )
        if stored is None:
            raise Interrupt("ghost")
        return stored

    async def _commit_in(
        self,
        tx: Transaction,
        now: datetime,
        entries: Sequence[JournalEntry],
        events: Sequence[EventBase],
        *,
        consume: Sequence[tuple[int, str]] = (),
        replies: Sequence[tuple[int, JsonValue]] = (),
        start_children: Sequence[ChildStart] = (),
        cancel_children: Sequence[str] = (),
        ai_calls: Sequence[AICall] = (),
    ) -> list[JournalEntry] | None:
        """The reading commit inside ``tx``: check ownership, then write. ``None`` when
        another execution owns the run now (a ghost: nothing of this one is recorded)."""
        causation = self._scope.causation_id
        owned = await self.owner(tx)
        if owned is None:
            # Another execution owns the run now: this one's entries are discarded,
            # but the model calls it made were paid for (kernel/ai.py).
            if ai_calls:
                await tx.ai_calls.record(marked_failed(ai_calls))
            return None
        run, stage = owned
        self.paused = run.paused
        run = await apply_attributes(tx, run, entries, now)
        # What a later commit without reads (``_append``) expects to find.
        self._s.run, self._s.stage = run, stage
        self._s.stages = [stage if st.stage_id == stage.stage_id else st for st in self._s.stages]
        stored = await write_entries(tx, entries, now)
        if ai_calls:
            await tx.ai_calls.record(ai_calls)
        for message_id, consumer in consume:
            await tx.inbox.consume(message_id, now, consumer)
        for message_id, reply in replies:
            await tx.inbox.set_reply(message_id, reply)
        if events:
            await tx.outbox.append([evolve(e, {"causation_id": causation}) for e in events])
        for spec in start_children:
            await start_child(self._deps, tx, run, spec, now, causation)
        for run_id in cancel_children:
            await cancel_run(self._deps, tx, run_id, "lost a race of its parent", now, causation)
        return stored

    async def _append(
        self,
        tx: Transaction,
        entries: Sequence[JournalEntry],
        events: Sequence[EventBase],
        causation: str | None,
    ) -> list[JournalEntry] | None:
        """The commit without reads, where ``tx`` offers it (``append_journal``,
        ``ports/persistence/journal.py``): the new entries and their events, written only
        while the run, its stage and the job are as this execution last committed or read
        them (``owner_of``); then ``tx`` has ended. ``None`` when it is not offered
        (nothing was sent: the caller goes on in ``tx``); ``_GuardFailedError`` when a guard
        failed (nothing was written: the caller commits through the reads, which decide
        as before)."""
        append = getattr(tx, "append_journal", None)
        if append is None:
            return None
        try:
            stored: list[JournalEntry] | None = await append(
                self._deps.job_transport,
                owner_of(self._s, self._worker_id),
                entries,
                [evolve(e, {"causation_id": causation}) for e in events],
            )
        except (ConcurrencyError, DuplicateError) as exc:
            raise _GuardFailedError from exc
        if stored is not None:
            self.paused = self._s.run.paused  # the run is as it was known
        return stored

    def child_workflow(self, workflow_id: str) -> WorkflowDefinition:
        return self._deps.workflow(workflow_id)

    async def peek_message(self, kind: str, name: str) -> InboxMessage | None:
        async with self._deps.persistence.transaction() as tx:
            return await tx.inbox.next_message(self._s.run.id, name, kind=kind)


def owner_of(s: Started, worker_id: str) -> JournalOwner:
    """What the execution ``s`` owns, as it last committed or read it."""
    return JournalOwner(
        run_id=s.run.id,
        run_version=s.run.version,
        stage_id=s.stage.stage_id,
        stage_version=s.stage.version,
        job_id=s.job.id,
        worker_id=worker_id,
        job_attempts=s.job.attempts,
    )


_Ended = tuple[JsonValue, BaseException | None, SagaOutcome | None]
"""How the body ended (``_run``): its output, its error, what its compensations did."""


async def execute_activation(
    deps: Deps, cmd: c.JobExecute, scope: Scope, s: Started, span: AttemptSpan | None = None
) -> c.JobExecuteResult:
    """Run the body once over the journal and commit how it ended (module docstring).
    A cancelled run's activation (``saga.is_compensating``) only runs its compensations.
    With sticky execution the body may instead resume where an earlier activation on
    this kernel parked it, and park again (``kernel.workflows.sticky``)."""
    wf = cast("CodeWorkflowDefinition", s.wf)
    writer = _Writer(deps, scope, s, cmd.worker_id, span)
    held = _take_parked(deps, s, wf)  # from here on, put back or dropped
    mismatch = version_mismatch(s.run, wf)
    if mismatch is not None:  # (a parked body would have been of another definition)
        return await _commit_blocked(deps, scope, s, writer, mismatch)
    token = CancellationToken()
    try:
        ctx, held, lost = await _open(deps, s, wf, writer, token, held)
        output, error, outcome = await _drive(deps, s, wf, ctx, held, token, lost)
        interrupt = ctx.interrupt
        if interrupt is not None and interrupt.reason == "crash":
            assert interrupt.error is not None
            raise interrupt.error  # job.execute releases the job with backoff; replay resumes
        if interrupt is not None and interrupt.reason == "fatal":
            error = interrupt.error
        if ctx.compensating:
            return await _finish_compensating(deps, scope, s, writer, ctx, outcome, error)
        result = await _finish(deps, scope, s, writer, ctx, output, error, outcome)
        if held is not None and held.body.parked and result.outcome == "suspended":
            # Its waits are committed by an execution that still owned the run: keep it.
            held.attempt = s.stage.attempt
            deps.sticky.put(s.run.id, held, deps.settings.sticky_cache_size)
            held = None
        return result
    finally:
        if held is not None and held.body.parked:
            deps.sticky.drop(held)


def _take_parked(deps: Deps, s: Started, wf: CodeWorkflowDefinition) -> Parked | None:
    """The body this kernel parked for the run, if it still describes the run
    (``sticky.reusable``); a stale one is dropped and counted as a miss."""
    held = deps.sticky.take(s.run.id)
    if held is None:
        return None
    stale = reusable(held, s.run, s.stage, wf)
    if stale is None:
        return held
    deps.sticky.misses += 1
    deps.sticky.drop(held)
    deps.logger.debug("workflow.sticky_miss", run_id=s.run.id, reason=stale)
    return None


async def _open(
    deps: Deps,
    s: Started,
    wf: CodeWorkflowDefinition,
    writer: _Writer,
    token: CancellationToken,
    held: Parked | None,
) -> tuple[WorkflowContext, Parked | None, PayloadMissingError | None]:
    """This activation's context and the parked body to drive, if any: ``held``'s own,
    handed this activation's writer and token and what the journal holds from its parked
    position on; or a new context over the whole journal (with a new body to drive when
    sticky execution is on). Third: a recorded value whose blob is gone, if one is."""
    lost: PayloadMissingError | None = None
    if held is not None:
        async with deps.persistence.transaction() as tx:
            try:
                fresh = await tx.journal.entries(s.run.id, from_position=held.ctx.parked_at)
            except PayloadMissingError as exc:  # as below: the run fails with it
                fresh, lost = [], exc
        held.ctx.resume(writer, token, wf.step_overrides, fresh)
        deps.sticky.hits += 1
        return held.ctx, held, lost
    if s.fresh:  # the run was created with this start: nothing journaled yet
        journal: list[JournalEntry] = []
    else:
        async with deps.persistence.transaction() as tx:
            try:
                journal = await tx.journal.entries(s.run.id)
            except PayloadMissingError as exc:  # a recorded value's blob is gone
                journal, lost = [], exc
    ctx = WorkflowContext(
        run_id=s.run.id,
        workflow_id=wf.id,
        version=s.run.workflow_version,
        journal=journal,
        writer=writer,
        now=deps.clock.now,
        new_id=deps.ids.new_id,
        overrides=wf.step_overrides,
        cancelled=token,
        compensating=s.run.status is RunStatus.CANCELLED,
        sticky=deps.settings.sticky_execution and deps.settings.sticky_cache_size > 0,
        ai=deps.ai,
        ai_totals=functools.partial(read_ai_totals, deps, s.run.id),
    )
    if ctx.sticky and lost is None:
        held = Parked(Body(_run(ctx, wf, s)), ctx, wf, s.stage.attempt)
    return ctx, held, lost


async def _drive(
    deps: Deps,
    s: Started,
    wf: CodeWorkflowDefinition,
    ctx: WorkflowContext,
    held: Parked | None,
    token: CancellationToken,
    lost: PayloadMissingError | None,
) -> _Ended:
    """Run the body (``_run``), or the parked one until it returns or parks again
    (then ``ctx.interrupt`` holds its wait); a lost payload fails the run instead, as if
    the body raised it."""
    if lost is not None:
        return None, lost, None
    ctx.driver = asyncio.current_task()
    try:
        with deps.inflight.track(s.job.id, s.run.id, token, by_run=not ctx.compensating):
            if held is None:
                return await _run(ctx, wf, s)
            if await held.body:
                return cast("_Ended", held.body.result)  # what ``_run`` returned
            return None, None, None
    finally:
        ctx.driver = None


async def _run(ctx: WorkflowContext, wf: CodeWorkflowDefinition, s: Started) -> _Ended:
    """The body over the journal; then, if it raised out (or the run was cancelled), its
    compensations. Returns the output, the error and the saga outcome (``None`` while
    compensations are unfinished or none ran)."""
    output: JsonValue = None
    error: BaseException | None = None
    try:
        if type(s.run.input) is MissingPayload:  # offloaded, and its blob is gone
            raise s.run.input.error()
        value = wf.input_adapter.validate_python(s.run.input)
    except PayloadMissingError as exc:
        error = exc
    except PydanticValidationError as exc:
        error = InvalidInputError.from_pydantic(
            f"workflow {wf.id!r} input does not match its model", exc, prefix="input"
        )
    else:
        try:
            returned = await wf.body(ctx, value)
        except Interrupt:
            pass
        except Exception as exc:
            error = exc
        except GeneratorExit:
            raise  # a parked body being dropped (sticky execution): nothing to record
        except BaseException as exc:  # KeyboardInterrupt, SystemExit, its own CancelledError
            failure = as_body_failure(exc, f"workflow {wf.id!r}")
            if failure is None:
                raise  # this task is being cancelled: the host is stopping
            error = failure
        else:
            try:
                output = validate_output(s.definition, returned)
            except OutputValidationError as exc:
                error = exc
    stopped = ctx.interrupt.reason if ctx.interrupt is not None else None
    must_undo = ctx.compensating or (error is not None and bool(ctx.compensations))
    if not must_undo or stopped in ("ghost", "fatal", "crash"):
        return output, error, None
    try:
        outcome = await run_compensations(ctx, "cancelled" if ctx.compensating else "failed")
    except Interrupt:
        return output, error, None  # ctx.interrupt says why; the next activation goes on
    return output, error, outcome


async def _commit_blocked(
    deps: Deps, scope: Scope, s: Started, writer: _Writer, error: VersionMismatchError
) -> c.JobExecuteResult:
    """The pinned version is not registered here: the body does not run; the run is
    blocked, not failed, until a worker with that version resumes it (versions.py)."""
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        owned = await writer.owner(tx)
        if owned is None:
            result = _ghost(s)
        else:
            run, stage = owned
            await deps.job_transport.complete(tx, s.job.id)
            if run.status.terminal:  # cancelled, compensations pending: it stays CANCELLED
                result = await _defer_compensations(deps, tx, scope, s, run, stage, error, now)
            else:
                stage = await block(deps, tx, run, stage, s.wf, error, now, scope.causation_id)
                result = _suspended_result(
                    run, stage, stage.next_poll_at, describe_exception(error)
                )
        await scope.complete(tx, result)
    return result


async def _defer_compensations(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    s: Started,
    run: Run,
    stage: StageRun,
    error: VersionMismatchError,
    now: datetime,
) -> c.JobExecuteResult:
    """A cancelled run's compensations must replay under the pinned version too: try the
    compensating activation again later (a cancelled run has no timers to wake it)."""
    message = describe_exception(error)
    at = now + deps.settings.version_recheck_interval
    result = await _requeue(deps, tx, s, run, stage, at, now, error=message)
    if message not in (run.error or ""):
        note = f"{run.error}; {message}" if run.error else message
        await tx.runs.update(evolve(run, {"error": note, "updated_at": now}))
        await tx.outbox.append([mismatch_event(run, s.wf, message, now, scope.causation_id)])
    return result


async def _finish(
    deps: Deps,
    scope: Scope,
    s: Started,
    writer: _Writer,
    ctx: WorkflowContext,
    output: JsonValue,
    error: BaseException | None,
    outcome: SagaOutcome | None = None,
) -> c.JobExecuteResult:
    now = deps.clock.now()
    interrupt = ctx.interrupt
    if (
        interrupt is None
        and error is None
        and outcome is None
        and ctx.nothing_waiting
        and not getattr(deps.persistence, "local_reads", False)
    ):
        try:
            return await _finish_trusted(deps, scope, s, ctx, output, now)
        except (NotBatchableError, ConcurrencyError, DuplicateError) as exc:  # rolled back
            deps.logger.debug("workflow.trusted_finish_fallback", run_id=s.run.id, reason=exc)
    async with deps.persistence.transaction() as tx:
        owned = None
        if interrupt is None or interrupt.reason != "ghost":
            owned = await writer.owner(tx)
        if owned is None:
            result = _ghost(s)
            await adopt_registrations(deps, tx, s.run.id, ctx.pending, now)
            await scope.complete(tx, result)
            return result
        run, stage = owned
        run = await _commit_pending(tx, scope, run, ctx, now)
        undoing = outcome is None and bool(ctx.compensations) and _suspended(interrupt)
        if error is not None and not undoing:
            result = await _commit_failed(deps, tx, scope, s, run, stage, error, now, outcome)
        elif interrupt is not None and interrupt.reason == "continue":
            result = await continue_run(
                deps, tx, run, stage, s.job.id, interrupt, now, scope.causation_id
            )
        elif interrupt is not None:
            result = await _commit_waits(deps, tx, scope, s, run, stage, interrupt.waits, now)
        else:
            result = await _commit_completed(deps, tx, scope, s, run, stage, output, now)
        await scope.complete(tx, result)
    return result


async def _finish_trusted(
    deps: Deps,
    scope: Scope,
    s: Started,
    ctx: WorkflowContext,
    output: JsonValue,
    now: datetime,
) -> c.JobExecuteResult:
    """The body returned: commit the calls still pending (its last step, by default),
    the stage and the run completed and the job done without reading anything back, as
    a pipeline's chained stage commits (``jobs._commit_trusted``). The run, stage and job
    are taken as this execution last committed or read them (``Started``) and every
    write is guarded by what it expects to replace (the run's and the stage's versions,
    the job's lease): whatever took the run from this activation meanwhile fails a guard,
    nothing is written, and the caller commits through the reads (a ghost, most likely).
    The run's end settles no waits (``ctx.nothing_waiting``: no children to cancel). On
    PostgreSQL the transaction is one statement (``tx.write_set`` with its journal part),
    sent without BEGIN/COMMIT."""
    async with deps.persistence.transaction() as tx:
        buffer = WriteBuffer(tx, {s.run.id: s.run}, {s.run.id: list(s.stages)}, {s.job.id: s.job})
        buffer.guard_jobs()
        buffer.nothing_waiting.add(s.run.id)
        buffered, buffered_tx = buffer.stand_in(deps)
        run = await apply_attributes(buffered_tx, s.run, ctx.pending, now)
        stored = await write_entries(buffered_tx, ctx.pending, now)
        if ctx.pending_events:
            await buffered_tx.outbox.append(
                [evolve(e, {"causation_id": scope.causation_id}) for e in ctx.pending_events]
            )
        result = await _commit_completed(buffered, buffered_tx, scope, s, run, s.stage, output, now)
        await scope.complete(buffered_tx, result)
        if not buffer.run_writes:  # nothing would lock the run or check its version
            raise NotBatchableError("the commit does not write the run")
        await buffer.flush(deps.job_transport, last=True)
    ctx.committed(stored)
    return result


def _suspended(interrupt: Interrupt | None) -> bool:
    return interrupt is not None and interrupt.reason == "suspend"


def _ghost(s: Started) -> c.JobExecuteResult:
    return c.JobExecuteResult(
        outcome="failed",
        workflow_run_id=s.run.id,
        stage_id=WORKFLOW_STAGE_ID,
        ghost=True,
        error="result discarded: run cancelled or activation taken over by another",
    )


async def _commit_pending(
    tx: Transaction, scope: Scope, run: Run, ctx: WorkflowContext, now: datetime
) -> Run:
    """The recorded calls not committed yet (``now``, ``publish``, ``set_attribute``, ...),
    their events and the search attributes they set; returns the run as stored."""
    run = await apply_attributes(tx, run, ctx.pending, now)
    stored = await write_entries(tx, ctx.pending, now)
    if ctx.pending_events:
        await tx.outbox.append(
            [evolve(e, {"causation_id": scope.causation_id}) for e in ctx.pending_events]
        )
    ctx.committed(stored)  # a parked body goes on from here (sticky execution)
    return run


async def _finish_compensating(
    deps: Deps,
    scope: Scope,
    s: Started,
    writer: _Writer,
    ctx: WorkflowContext,
    outcome: SagaOutcome | None,
    error: BaseException | None,
) -> c.JobExecuteResult:
    """Commit a compensating activation of a cancelled run: a compensation waiting to
    retry queues the next activation at its due time (a cancelled run never sleeps on
    timers); else the stage becomes CANCELLED and the run's error records the outcome."""
    now = deps.clock.now()
    interrupt = ctx.interrupt
    async with deps.persistence.transaction() as tx:
        owned = None
        if interrupt is None or interrupt.reason != "ghost":
            owned = await writer.owner(tx)
        if owned is None:
            result = _ghost(s)
            await scope.complete(tx, result)
            return result
        run, stage = owned
        run = await _commit_pending(tx, scope, run, ctx, now)
        await deps.job_transport.complete(tx, s.job.id)
        if outcome is None and interrupt is not None and interrupt.reason == "suspend":
            due = [w.until for w in interrupt.waits if w.until is not None]
            result = await _requeue(deps, tx, s, run, stage, min(due, default=now), now)
        else:
            if outcome is not None:
                note = outcome.describe()
                await tx.outbox.append([outcome.event(run.id, now, scope.causation_id)])
            else:  # the replay itself failed (non-determinism): nothing can be undone
                note = "not compensated: " + describe_exception(error or Exception("unknown"))
            await tx.stages.update(
                evolve(
                    stage,
                    {"status": StageStatus.CANCELLED, "completed_at": now, "job_id": None},
                )
            )
            reason = f"{run.error}; {note}" if run.error else note
            await tx.runs.update(evolve(run, {"error": reason, "updated_at": now}))
            result = c.JobExecuteResult(
                outcome="failed", workflow_run_id=run.id, stage_id=stage.stage_id, error=reason
            )
        await scope.complete(tx, result)
    return result


async def _commit_completed(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    s: Started,
    run: Run,
    stage: StageRun,
    output: JsonValue,
    now: datetime,
) -> c.JobExecuteResult:
    stage = await tx.stages.update(
        evolve(
            stage,
            {"status": StageStatus.COMPLETED, "output": output, "completed_at": now},
        )
    )
    await deps.job_transport.complete(tx, s.job.id)
    completed = StageCompleted(
        workflow_run_id=run.id,
        timestamp=now,
        causation_id=scope.causation_id,
        stage_id=stage.stage_id,
        attempt=stage.attempt,
        output=output,
        duration=now - stage.started_at if stage.started_at else None,
    )
    # A code workflow's run has this one stage: its stages are known without a read,
    # and ``stage:completed`` goes in the transition's one append.
    stages = [stage if st.stage_id == stage.stage_id else st for st in s.stages]
    await apply_transition(
        deps, tx, run, stages, s.wf, now, scope.causation_id, prior_events=[completed]
    )
    return c.JobExecuteResult(
        outcome="completed", workflow_run_id=run.id, stage_id=stage.stage_id, output=output
    )


async def _commit_failed(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    s: Started,
    run: Run,
    stage: StageRun,
    error: BaseException,
    now: datetime,
    outcome: SagaOutcome | None = None,
) -> c.JobExecuteResult:
    """The body raised: the run fails with the body's own error (a workflow's logic
    failing is not retried; its steps have retry policies for that), followed by what
    its compensations did, if it had any."""
    message = describe_exception(error)
    if outcome is not None:
        message = f"{message}; {outcome.describe()}"
        await tx.outbox.append([outcome.event(run.id, now, scope.causation_id)])
    stage = await fail_stage_for_good(
        deps,
        tx,
        stage,
        s.job.id,
        message,
        now,
        scope.causation_id,
        traceback=short_traceback(error),
    )
    await fail_run(deps, tx, run, [stage], message, now, scope.causation_id)
    return c.JobExecuteResult(
        outcome="failed", workflow_run_id=run.id, stage_id=stage.stage_id, error=message
    )


async def _commit_waits(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    s: Started,
    run: Run,
    stage: StageRun,
    waits: Sequence[Wait],
    now: datetime,
) -> c.JobExecuteResult:
    """Record each wait and its timer; then either suspend the stage until the earliest
    timer, or (a signal arrived meanwhile, a short backoff) queue the next activation."""
    resume_at: datetime | None = None
    for wait in waits:
        at = await _record_wait(deps, tx, run.id, wait, now, scope.causation_id)
        if at is not None:
            resume_at = at if resume_at is None else min(resume_at, at)
    await deps.job_transport.complete(tx, s.job.id)
    if resume_at is not None:
        return await _requeue(deps, tx, s, run, stage, resume_at, now)
    timers = forward_timers(await tx.timers.pending(run.id))
    next_poll = timers[0].fire_at if timers else None
    stage = await tx.stages.update(
        evolve(
            stage,
            {
                "status": StageStatus.SUSPENDED,
                "next_poll_at": next_poll,
                "suspend_deadline": None,
                "job_id": None,
            },
        )
    )
    waiting_for = describe_waits(waits) if waits else ("paused" if run.paused else None)
    await apply_transition(
        deps, tx, run, [stage], s.wf, now, scope.causation_id, waiting_for=waiting_for
    )
    return _suspended_result(run, stage, next_poll)


async def _requeue(
    deps: Deps,
    tx: Transaction,
    s: Started,
    run: Run,
    stage: StageRun,
    at: datetime,
    now: datetime,
    error: str | None = None,
) -> c.JobExecuteResult:
    """Hand the body to a new activation job available from ``at`` instead of timers: the
    stage waits PENDING for it (a short backoff, a message that came while the body
    unwound, a cancelled run's compensations to retry)."""
    await tx.stages.update(evolve(stage, {"status": StageStatus.PENDING, "job_id": None}))
    await enqueue_activation(deps, tx, run, s.wf, at, now)
    return _suspended_result(run, stage, at, error)


def _suspended_result(
    run: Run, stage: StageRun, at: datetime | None, error: str | None = None
) -> c.JobExecuteResult:
    """The result of an activation that ended waiting; ``at`` is when the run is next
    looked at (its new job, its earliest timer), ``None`` while only a message wakes it."""
    return c.JobExecuteResult(
        outcome="suspended",
        workflow_run_id=run.id,
        stage_id=stage.stage_id,
        error=error,
        next_poll_at=at,
    )


async def _record_wait(
    deps: Deps,
    tx: Transaction,
    run_id: str,
    wait: Wait,
    now: datetime,
    causation_id: str | None = None,
) -> datetime | None:
    """Journal one wait; returns when to run again without a timer, if so."""
    entry = await tx.journal.get(run_id, wait.name, wait.occurrence)
    if wait.kind == "child":  # the child's end completes the entry and wakes the run
        ended = entry is not None and entry.status is not JournalStatus.WAITING
        return now if ended else None  # ... unless it ended while the body was unwinding
    if wait.kind == "retry":
        assert wait.until is not None
        if wait.until - now <= deps.settings.step_backoff_suspend_after:
            return wait.until
        await _schedule(tx, run_id, wait, "retry", now)
        return None
    if wait.kind in ("signal", "update"):
        assert wait.signal is not None
        message = await tx.inbox.next_message(run_id, wait.signal, kind=wait.kind)
        if message is not None:  # arrived while the body was unwinding: take it now
            assert message.id is not None
            done = _waiting(run_id, wait, now, entry, JournalStatus.COMPLETED)
            done = evolve(done, {"result": message_result(message), "completed_at": now})
            await write_entries(tx, [done], now)
            await tx.inbox.consume(message.id, now, f"{wait.name}#{wait.occurrence}")
            return now
    if entry is None:
        await write_entries(tx, [_waiting(run_id, wait, now, None, JournalStatus.WAITING)], now)
        if wait.until is not None:
            purpose = "sleep" if wait.kind == "sleep" else f"{wait.kind}_timeout"
            await _schedule(tx, run_id, wait, purpose, now)
        if wait.kind == "review":
            details = wait.details or {}
            await tx.outbox.append(
                [
                    ReviewRequested(
                        workflow_run_id=run_id,
                        timestamp=now,
                        causation_id=causation_id,
                        review_id=str(details["review_id"]),
                        review_type=details.get("review_type"),
                        reviewers=list(details.get("reviewers") or []),
                    )
                ]
            )
    return None


def _waiting(
    run_id: str, wait: Wait, now: datetime, entry: JournalEntry | None, status: JournalStatus
) -> JournalEntry:
    data: dict[str, Any] = {}
    if wait.until is not None:
        data["until"] = wait.until.isoformat()
    if wait.signal is not None:
        data["signal"] = wait.signal
    data.update(wait.details or {})
    if entry is not None:
        return evolve(entry, {"status": status})
    return JournalEntry(
        workflow_run_id=run_id,
        position=wait.position,
        name=wait.name,
        occurrence=wait.occurrence,
        kind=wait.kind,
        status=status,
        input=data or None,
        created_at=now,
    )


async def _schedule(tx: Transaction, run_id: str, wait: Wait, purpose: str, now: datetime) -> None:
    assert wait.until is not None
    await tx.timers.schedule(
        Timer(
            workflow_run_id=run_id,
            name=wait.name,
            occurrence=wait.occurrence,
            purpose=purpose,
            fire_at=wait.until,
            created_at=now,
        )
    )
