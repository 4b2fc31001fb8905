"""``job.execute``: run one stage in three phases.

1. commit: the stage is RUNNING, its attempt counted, ``stage:started`` appended;
2. run the stage body outside any transaction (sync bodies in a thread);
3. commit the outcome (result, suspension, or failure with retry/backoff) together
   with the job's new state, the buffered logs and annotations, and the run's
   transition, unless the run was cancelled or the job re-leased meanwhile: then
   the result is a ghost and is discarded.

A job that cannot even be started (workflow missing from this worker's registry,
storage failure) is released with backoff or failed, never left leased forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pydantic import ValidationError as PydanticValidationError

import treadle.kernel.commands as c
from treadle.kernel.ai import AITotals
from treadle.kernel.context import CancellationToken, StageContext
from treadle.kernel.definitions import StageDefinition, Suspend, WorkflowDefinition
from treadle.kernel.errors import (
    ConcurrencyError,
    InvalidInputError,
    JobNotFoundError,
    NonRetryableError,
    NotSupportedError,
    OutputValidationError,
    PayloadMissingError,
    StageNotFoundError,
    StageTimeoutError,
    as_body_failure,
    describe_exception,
    short_traceback,
)
from treadle.kernel.events import (
    EventBase,
    StageCompleted,
    StageFailed,
    StageProgress,
    StageStarted,
    StageSuspended,
)
from treadle.kernel.handlers.basics import load_run
from treadle.kernel.handlers.common import (
    LazyOutputs,
    apply_transition,
    decide,
    fail_stage_for_good,
    group_input,
    lost_input,
)
from treadle.kernel.handlers.effects import commit_stage_extras, read_ai_totals
from treadle.kernel.handlers.execution import Started, is_current, validate_output
from treadle.kernel.handlers.leases import settle_lease
from treadle.kernel.handlers.lifecycle import hold_job
from treadle.kernel.handlers.write_buffer import NotBatchableError, WriteBuffer
from treadle.kernel.model import (
    Job,
    JobStatus,
    JsonValue,
    MissingPayload,
    Run,
    RunStatus,
    StageRun,
    StageStatus,
    construct,
    evolve,
)
from treadle.kernel.workflows.executor import execute_activation
from treadle.kernel.workflows.saga import is_compensating

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps, Scope
    from treadle.ports import AttemptSpan, Telemetry, Transaction


# Bound once: reading a member through its Enum class goes through the metaclass on
# every stage (about 80 ns each in 3.11).
_STAGE_RUNNING = StageStatus.RUNNING
_STAGE_COMPLETED = StageStatus.COMPLETED
_JOB_LEASED = JobStatus.LEASED


@dataclass
class Outcome:
    kind: str  # "completed" | "suspended" | "failed"
    output: JsonValue = None
    suspend: Suspend | None = None
    error: BaseException | None = None


class StageRuntime:
    """Progress and heartbeats from a running stage, flushed off the body's path."""

    def __init__(self, deps: Deps, started: Started, worker_id: str) -> None:
        self._deps = deps
        self._started = started
        self._worker_id = worker_id
        self._loop = asyncio.get_running_loop()
        # Made by the first progress report or heartbeat: most stages send neither.
        self._tasks: set[asyncio.Task[None]] | None = None
        self._latest_progress: tuple[float, str | None] | None = None
        self.lost_lease = False

    def _spawn(self, coro_fn: Any) -> None:
        def start() -> None:
            task = self._loop.create_task(coro_fn())
            if self._tasks is None:
                self._tasks = set()
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            start()
        else:  # called from a sync stage running in a worker thread
            self._loop.call_soon_threadsafe(start)

    def report_progress(self, fraction: float, message: str | None) -> None:
        self._latest_progress = (fraction, message)
        self._spawn(self._flush_progress)

    async def _flush_progress(self) -> None:
        progress, self._latest_progress = self._latest_progress, None
        if progress is None:  # a newer report already flushed this one
            return
        s = self._started
        try:
            async with self._deps.persistence.transaction() as tx:
                await tx.outbox.append(
                    [
                        StageProgress(
                            workflow_run_id=s.run.id,
                            stage_id=s.stage.stage_id,
                            timestamp=self._deps.clock.now(),
                            fraction=progress[0],
                            message=progress[1],
                        )
                    ]
                )
        except Exception as exc:  # progress is advisory; never fail the stage for it
            self._deps.logger.warning("stage.progress_failed", error=describe_exception(exc))

    def heartbeat(self) -> None:
        self._spawn(self._beat)

    async def _beat(self) -> None:
        ok = await self._deps.job_transport.extend_lease(
            self._started.job.id, self._worker_id, self._deps.clock.now()
        )
        if not ok:
            self.lost_lease = True

    @property
    def busy(self) -> bool:
        """Whether progress or heartbeat writes are still in flight."""
        return bool(self._tasks)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def put_blob(self, key: str, data: bytes) -> None:
        await self._deps.blob_store.put(key, data)

    async def get_blob(self, key: str) -> bytes:
        return await self._deps.blob_store.get(key)

    async def has_blob(self, key: str) -> bool:
        return await self._deps.blob_store.has(key)

    async def list_blobs(self, prefix: str) -> list[str]:
        return await self._deps.blob_store.list(prefix)

    async def ai_totals(self, run_id: str) -> AITotals | None:
        return await read_ai_totals(self._deps, run_id)


async def execute(deps: Deps, cmd: c.JobExecute, scope: Scope) -> c.JobExecuteResult:
    # The hand-off a chained commit left for this job, if any (see the note below).
    started_or_result: Started | c.JobExecuteResult | None = deps.chains.take(
        cmd.job_id, cmd.worker_id
    )
    if started_or_result is None:
        try:
            started_or_result = await phase_start(deps, cmd, scope)
        except JobNotFoundError:
            raise
        except Exception as exc:
            await release_after_error(deps, cmd, exc)
            raise
    if isinstance(started_or_result, c.JobExecuteResult):
        return started_or_result
    started = started_or_result
    # Tracing (``ports/telemetry.py``): the attempt's span is current while the body runs
    # and its outcome commits, so user spans and the kernel's log lines nest under it.
    # Off (``None``), this costs two tests: no call, no frame.
    span: AttemptSpan | None = None
    active: AbstractContextManager[None] | None = None
    if deps.telemetry is not None:
        span = _attempt_span(deps.telemetry, cmd, started)
        active = span.active()
        active.__enter__()
    try:
        if started.wf.kind == "code":
            try:
                result = await execute_activation(deps, cmd, scope, started, span)
            except Exception as exc:
                await release_after_error(deps, cmd, exc)
                raise
        else:
            token = CancellationToken()
            runtime = StageRuntime(deps, started, cmd.worker_id)
            ctx, outcome = build_context(deps, started, runtime, token)
            if outcome is None:
                inflight, job_id = deps.inflight, started.job.id
                inflight.add(job_id, ctx.run_id, token)
                try:
                    outcome = await _run_body(started.definition, ctx)
                finally:
                    inflight.remove(job_id, token)
            if runtime._tasks:  # progress or heartbeat writes still in flight (``busy``)
                await runtime.drain()
            try:
                result = await phase_commit(deps, cmd, scope, started, ctx, outcome)
            except Exception as exc:
                await release_after_error(deps, cmd, exc)
                raise
            log_outcome(deps, cmd, started, result)
    except BaseException as exc:
        if span is not None:
            span.end("errored", error=exc)
        raise
    finally:
        if active is not None:
            active.__exit__(None, None, None)
    if span is not None:
        _end_span(span, started, result)
    return result


def _end_span(span: AttemptSpan, started: Started, result: c.JobExecuteResult) -> None:
    """How the attempt ended; a batch stage that suspended notes when it is polled next
    (an activation notes its own waits as the body reaches them)."""
    polled = result.next_poll_at
    if result.outcome == "suspended" and polled is not None and started.wf.kind != "code":
        until = polled.isoformat()
        span.event("treadle.wait", {"treadle.wait.kind": "poll", "treadle.wait.until": until})
    span.end(
        "ghost" if result.ghost else result.outcome,
        error=result.error,
        retrying=result.outcome == "failed" and result.retryable,
    )


def _attempt_span(telemetry: Telemetry, cmd: c.JobExecute, started: Started) -> AttemptSpan:
    kind = "activation" if started.wf.kind == "code" else "stage"
    stage = started.stage
    return telemetry.stage_attempt(
        started.run, stage.stage_id, stage.attempt, cmd.worker_id, kind=kind
    )


def log_outcome(deps: Deps, cmd: c.JobExecute, s: Started, result: c.JobExecuteResult) -> None:
    # The fields go with the call rather than through ``bind``: binding builds a new
    # logger per stage even when the level filters the line out.
    stage = s.stage
    outcome = result.__dict__  # one read through pydantic's ``__getattr__`` hook
    if outcome["ghost"] or outcome["outcome"] == "failed":
        fields = {
            "run_id": s.run.id,
            "stage_id": stage.stage_id,
            "worker_id": cmd.worker_id,
            "job_id": cmd.job_id,
            "attempt": stage.attempt,
        }
        if result.ghost:
            deps.logger.warning("stage.result_discarded", **fields, reason=result.error)
        else:
            deps.logger.warning(
                "stage.failed", **fields, error=result.error, will_retry=result.retryable
            )
        return
    # Every stage's line: keywords straight into the call, not a dict unpacked into it.
    ours, command = stage.__dict__, cmd.__dict__
    deps.logger.info(
        _OUTCOME_EVENT[outcome["outcome"]],
        run_id=ours["workflow_run_id"],
        stage_id=ours["stage_id"],
        worker_id=command["worker_id"],
        job_id=command["job_id"],
        attempt=ours["attempt"],
    )


_OUTCOME_EVENT = {"completed": "stage.completed", "suspended": "stage.suspended"}


# The note: ``deps.chains.take(job_id, worker_id)`` in ``execute`` returns the stage a
# chained commit already started for this job and worker, if this kernel holds it: phase
# 1 committed with the previous stage's result, so there is nothing to read or write
# before the body runs. Phase 3 re-checks ownership as always, so a run cancelled (or a
# lease reaped) since then yields a ghost. ``None`` for another worker's call: phase 1
# refuses it as usual.


def _started_by_chain(job: Job, stage: StageRun) -> bool:
    """Phase 1 of this very lease already committed with the previous stage's result
    (``chain=True``), but this kernel holds no hand-off (another process, or dropped)."""
    return stage.status is _STAGE_RUNNING and stage.job_id == job.id


async def phase_start(
    deps: Deps, cmd: c.JobExecute | c.JobBegin, scope: Scope
) -> Started | c.JobExecuteResult:
    """Phase 1: the stage RUNNING, its attempt counted, ``stage:started``; or a ghost
    result when the run or lease moved on. ``job.begin`` (``handlers/remote.py``) is this
    phase alone, for a remote stage; ``job.execute`` refuses remote stages."""
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.JobExecuteResult", cached)
        job = await deps.job_transport.get(tx, cmd.job_id)
        if job is None:
            raise JobNotFoundError(f"no job with id {cmd.job_id!r}")
        if job.status is not _JOB_LEASED or job.worker_id != cmd.worker_id:
            result = c.JobExecuteResult(
                outcome="failed",
                workflow_run_id=job.workflow_run_id,
                stage_id=job.stage_id,
                ghost=True,
                error=f"job is {job.status.value}, not leased by {cmd.worker_id!r}",
            )
            await scope.complete(tx, result)
            return result
        run = await tx.runs.get(job.workflow_run_id, for_update=True)
        # All of the run's stages in one read (the context needs them), ours among them.
        stages = await tx.stages.for_run(job.workflow_run_id) if run is not None else []
        index = _index_of(stages, job.stage_id)
        stage = stages[index] if index >= 0 else None
        if (
            run is None
            or stage is None
            or stage.status.terminal
            or (run.status.terminal and not is_compensating(run, stage))
        ):
            # Cancelled (or finished by another execution) before we started: nothing to do.
            await deps.job_transport.complete(tx, job.id)
            state = run.status.value if run is not None else "missing"
            result = c.JobExecuteResult(
                outcome="failed",
                workflow_run_id=job.workflow_run_id,
                stage_id=job.stage_id,
                ghost=True,
                error=f"run is {state}; stage not executed",
            )
            await scope.complete(tx, result)
            return result
        if run.paused and not _started_by_chain(job, stage) and not run.status.terminal:
            return await _hold(deps, tx, scope, job, now)
        wf = deps.workflow(run.workflow_id, run.workflow_version)
        definition = wf.stage(stage.stage_id)
        if definition is None:
            raise StageNotFoundError(
                f"workflow {wf.id!r} version {wf.version} has no stage {stage.stage_id!r}"
            )
        if definition.remote is not isinstance(cmd, c.JobBegin):
            raise NotSupportedError(
                f"stage {stage.stage_id!r} of workflow {wf.id!r} is remote: only remote "
                "workers execute it (job.begin)"
                if definition.remote
                else f"stage {stage.stage_id!r} of workflow {wf.id!r} is not remote: "
                "job.begin serves only stages defined with remote=True"
            )
        if not _started_by_chain(job, stage):
            stage = await tx.stages.update(_running(stage, job, now))
            if run.status is RunStatus.SUSPENDED:
                run = await tx.runs.update(
                    evolve(run, {"status": RunStatus.RUNNING, "error": None, "updated_at": now})
                )
            await tx.outbox.append([_started_event(stage, cmd.worker_id, now, scope)])
            stages = _replaced(stages, index, stage)
    return Started(job, run, stage, wf, definition, stages, index=index)


async def _hold(
    deps: Deps, tx: Transaction, scope: Scope, job: Job, now: datetime
) -> c.JobExecuteResult:
    """The run is paused (``handlers/lifecycle.py``): the stage does not start; the job
    is held, its attempt given back, until ``run.resume`` queues it again. Nothing is
    cached under the key: the job runs later under the same per-attempt key."""
    await hold_job(deps, tx, job, now)
    await scope.forget(tx)
    return c.JobExecuteResult(
        outcome="suspended",
        workflow_run_id=job.workflow_run_id,
        stage_id=job.stage_id,
        error="run is paused; stage not started",
    )


def _running(stage: StageRun, job: Job, now: datetime) -> StageRun:
    """The stage as phase 1 commits it: RUNNING, its attempt counted, tied to ``job``."""
    fields = stage.__dict__  # one read through pydantic's ``__getattr__`` hook
    return evolve(
        stage,
        {
            "status": _STAGE_RUNNING,
            "attempt": fields["attempt"] + 1,
            "started_at": fields["started_at"] or now,
            "error": None,
            "error_traceback": None,
            "retryable": None,
            "job_id": job.id,
        },
    )


def _started_event(stage: StageRun, worker_id: str, now: datetime, scope: Scope) -> StageStarted:
    # ``construct``: every value is the kernel's own (a stored stage's, the clock's).
    fields = stage.__dict__  # one read through pydantic's ``__getattr__`` hook
    return construct(
        StageStarted,
        {
            "workflow_run_id": fields["workflow_run_id"],
            "timestamp": now,
            "causation_id": scope.causation_id,
            "stage_id": fields["stage_id"],
            "attempt": fields["attempt"],
            "worker_id": worker_id,
        },
    )


def _index_of(stages: Sequence[StageRun], stage_id: str, hint: int = -1) -> int:
    """Position of ``stage_id`` in ``stages``, or -1. ``hint``: where it probably is (as
    ``Started.index`` noted it, or the stage after the one that just completed), checked
    first: one field read instead of one per stage before it. Otherwise a loop (``next()``
    over a generator costs a generator object and a frame per stage)."""
    if 0 <= hint < len(stages) and stages[hint].stage_id == stage_id:
        return hint
    for i, st in enumerate(stages):
        if st.stage_id == stage_id:
            return i
    return -1


def _replaced(stages: list[StageRun], index: int, stage: StageRun) -> list[StageRun]:
    """A copy of ``stages`` with ``stage`` at ``index`` (one list, not three slices)."""
    copy = stages.copy()
    copy[index] = stage
    return copy


def _stage_input(s: Started) -> tuple[JsonValue, PayloadMissingError | None]:
    """The stage's raw input (the run's, or the previous group's output) and the error
    for an offloaded input or resume state whose blob is gone (``lost_input``). The stage
    after a group of one stage (a sequence), located by ``Started.index``, is read
    directly: a handful of field reads where ``group_input`` and ``lost_input`` walk the
    run's stages (each field read of a model goes through pydantic's ``__getattr__``)."""
    stage, index = s.stage, s.index
    group = stage.execution_group
    if group > 0 and index > 0:
        previous = s.wf.groups[group - 1]
        before = s.stages[index - 1]
        if len(previous) == 1 and before.stage_id == previous[0].id:
            resume, output = stage.resume_state, before.output
            if type(resume) is MissingPayload:
                return None, resume.error()
            if type(output) is MissingPayload:
                return None, output.error()
            return (output if before.status is _STAGE_COMPLETED else None), None
    raw = s.run.input if group == 0 else group_input(s.wf, s.stages, group)
    return raw, lost_input(s.run, s.stages, stage)


def build_context(
    deps: Deps, s: Started, runtime: StageRuntime, token: CancellationToken
) -> tuple[StageContext[Any, Any], Outcome | None]:
    """The stage's validated input and config; a bad input is a non-retryable failure."""
    raw_input, lost = _stage_input(s)  # lost: an offloaded input whose blob is gone
    failure: Outcome | None = None
    value: Any = None
    adapter = s.definition.input_adapter
    if lost is not None:
        failure = Outcome("failed", error=lost)
    elif adapter is not None:
        try:
            # The adapter's validator itself, as ``validate_output`` uses its serializer:
            # ``TypeAdapter.validate_python`` only forwards its default keywords to it.
            value = adapter.validator.validate_python(raw_input)
        except PydanticValidationError as exc:
            err = InvalidInputError.from_pydantic(
                f"stage {s.stage.stage_id!r} input does not match its model", exc, prefix="input"
            )
            failure = Outcome("failed", error=err)
    # The run's and the stage's fields through one ``__dict__`` read each: every field
    # read of a model goes through pydantic's ``__getattr__`` hook.
    run, stage = s.run.__dict__, s.stage.__dict__
    run_id, stage_id = run["id"], stage["stage_id"]
    config = None
    if s.definition.config_model is not None:
        config = s.definition.config_model.model_validate(run["config"].get(stage_id, {}))
    ctx: StageContext[Any, Any] = StageContext(
        input=value,
        config=config,
        run_id=run_id,
        workflow_id=run["workflow_id"],
        stage_id=stage_id,
        attempt=stage["attempt"],
        idempotency_key=f"{run_id}:{stage_id}",
        outputs=LazyOutputs(s.stages),
        workflow=s.wf,
        runtime=runtime,
        now=deps.clock.now,
        resume_state=stage["resume_state"],
        cancelled=token,
        ai=deps.ai,
    )
    return ctx, failure


async def _run_body(definition: StageDefinition, ctx: StageContext[Any, Any]) -> Outcome:
    """Run the body; business failures become an ``Outcome``, never an exception.

    The body runs in this very task (``asyncio.timeout``, not ``wait_for``'s inner task),
    so a ``KeyboardInterrupt`` or ``SystemExit`` it raises reaches the handler below
    rather than the event loop, and ``as_body_failure`` can tell a cancellation of this
    task (the host stopping: it goes on up) from one the body raised itself."""
    limit = definition.timeout
    try:
        if definition.is_async:
            pending: Any = definition.fn(ctx)
        else:
            pending = asyncio.to_thread(definition.fn, ctx)
        if limit is not None:
            deadline = asyncio.timeout(limit.total_seconds())
            try:
                async with deadline:
                    value = await pending
            except TimeoutError:
                if not deadline.expired():
                    raise  # the body's own TimeoutError: an ordinary failure
                raise StageTimeoutError(
                    f"stage {definition.id!r} exceeded its timeout of {limit}"
                ) from None
        else:
            value = await pending
    except Exception as exc:
        return Outcome("failed", error=exc)
    except BaseException as exc:
        failure = as_body_failure(exc, f"stage {definition.id!r}")
        if failure is None:
            raise
        return Outcome("failed", error=failure)
    if isinstance(value, Suspend):
        if not definition.is_batch:
            err = NonRetryableError(
                f"stage {definition.id!r} returned Suspend but is not a batch stage "
                "(use define_batch_stage)"
            )
            return Outcome("failed", error=err)
        return Outcome("suspended", suspend=value)
    try:
        return Outcome("completed", output=validate_output(definition, value))
    except OutputValidationError as exc:
        return Outcome("failed", error=exc)


@dataclass(slots=True)
class _Commit:
    """One finished execution waiting for its phase-3 commit."""

    deps: Deps
    cmd: c.JobExecute
    scope: Scope
    started: Started
    ctx: StageContext[Any, Any] | None
    """``None`` for a remote execution (``handlers/remote.py``): no logs, no annotations."""
    outcome: Outcome
    groupable: bool = False
    """``_groupable(item)``, decided once by ``phase_commit``."""


async def phase_commit(
    deps: Deps,
    cmd: c.JobExecute,
    scope: Scope,
    s: Started,
    ctx: StageContext[Any, Any] | None,
    outcome: Outcome,
) -> c.JobExecuteResult:
    """Phase 3: commit ``outcome`` (group commit when it can), ghost check included."""
    item = _Commit(deps, cmd, scope, s, ctx, outcome)
    item.groupable = groupable = _groupable(item)
    if groupable and deps.settings.group_commit:
        # In memory (``local_reads``) a commit never waits: nothing would join a group in
        # the turn a leader waits, and that turn would reorder the harness's steps.
        gather = not getattr(deps.persistence, "local_reads", False)
        result: c.JobExecuteResult = await deps.commits.submit(
            item, _commit_items, _commit_alone, gather=gather
        )
        return result
    return await _commit_alone(item)


def _commit_items(group: Sequence[_Commit]) -> Awaitable[list[c.JobExecuteResult | BaseException]]:
    """``GroupCommit``'s ``commit_group``: module-level (every item carries its ``deps``),
    so a submission builds no closure."""
    return _commit_group(group[0].deps, group)


def _groupable(item: _Commit) -> bool:
    """Whether a group commit carries this outcome (``write_buffer``): a completed stage
    with no buffered logs or annotations, the hot path. Everything else commits alone."""
    ctx = item.ctx
    return item.outcome.kind == "completed" and (
        ctx is None or not (ctx.logs or ctx.annotations or ctx.recorded_ai_calls)
    )


async def _commit_alone(item: _Commit) -> c.JobExecuteResult:
    """Phase 3 in a transaction of its own (also ``GroupCommit``'s ``commit_one``)."""
    deps = item.deps
    now = deps.clock.now()
    if item.groupable and not getattr(deps.persistence, "local_reads", False):
        try:
            return await _commit_trusted(deps, item, now)
        except (NotBatchableError, ConcurrencyError) as exc:  # rolled back: read and retry
            deps.logger.debug("job.trusted_commit_fallback", job_id=item.cmd.job_id, reason=exc)
    async with deps.persistence.transaction() as tx:
        result, chained = await _commit_in(deps, tx, item, now)
    if chained is not None:  # only once its start has committed
        deps.chains.keep(chained.job.id, item.cmd.worker_id, chained)
    return result


async def _commit_trusted(deps: Deps, item: _Commit, now: datetime) -> c.JobExecuteResult:
    """Phase 3 of a completed stage without reading anything back: the job, run and
    stages are taken as this execution last committed (or read) them, in ``Started``,
    and every write is guarded by what it expects to replace.

    The run is written first (``WriteBuffer.flush``): its update takes the run's row lock,
    in the order every other writer of a run takes it, and fails unless the run still
    has the version this execution knows. The stage updates fail unless each stage still
    has its known version. Whatever could have moved this stage on meanwhile changes one
    of them: a cancel, pause or rerun writes the run; a lease released or reaped, and any
    other execution of the stage, write the stage (``settle_lease``, phase 1). The job's
    completion, last, is guarded too (still LEASED to this worker at this attempt), so
    even a lease moved on by a path that leaves the stage alone is caught. A failed guard
    raises ``ConcurrencyError`` (and a commit that does not write the run,
    ``NotBatchableError``): the transaction rolls back, and the caller commits again with
    the reads, which decides as before (a ghost, most likely). So the result is the one
    the read path would commit, in a transaction of writes only: on PostgreSQL one
    statement (``tx.write_set``) sent without BEGIN/COMMIT: one round trip, where the
    per-kind statements took seven (BEGIN, five, COMMIT) and the reading path twelve.
    A persistence whose reads cost no round trip (``local_reads``, the in-memory
    adapter) commits through the reads: buffering would only add work there."""
    s = item.started
    async with deps.persistence.transaction() as tx:
        buffer = WriteBuffer(tx, {s.run.id: s.run}, {s.run.id: list(s.stages)}, {s.job.id: s.job})
        buffer.guard_jobs()
        buffered, buffered_tx = buffer.stand_in(deps)
        result, chained = await _commit_in(buffered, buffered_tx, item, now)
        if not buffer.run_writes:  # nothing would lock the run or check its version
            raise NotBatchableError("the commit does not write the run")
        # The flush is all this transaction writes: on PostgreSQL its one statement is
        # sent without BEGIN/COMMIT (``adapters/sql/persistence/write_set.py``).
        await buffer.flush(deps.job_transport, last=True)
    if chained is not None:
        deps.chains.keep(chained.job.id, item.cmd.worker_id, chained)
    return result


async def _commit_group(
    deps: Deps, group: Sequence[_Commit]
) -> list[c.JobExecuteResult | BaseException]:
    """Commit ``group`` in one transaction; if that fails for any reason (an item the
    buffer does not carry, a lost race, a deadlock), commit each item alone, so every
    item ends exactly as it would have without the group."""
    if len(group) > 1:
        if not getattr(deps.persistence, "local_reads", False):
            try:
                return await _commit_together_trusted(deps, group)
            except Exception as exc:  # rolled back: the group commits again with its reads
                deps.logger.debug("job.trusted_group_fallback", size=len(group), reason=repr(exc))
        try:
            return list(await _commit_together(deps, group))
        except Exception as exc:
            deps.logger.debug("job.group_commit_fallback", size=len(group), reason=repr(exc))
    outcomes: list[c.JobExecuteResult | BaseException] = []
    for item in group:
        try:
            outcomes.append(await _commit_alone(item))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


async def _commit_together_trusted(
    deps: Deps, group: Sequence[_Commit]
) -> list[c.JobExecuteResult | BaseException]:
    """``_commit_trusted`` for a whole group: every item's phase 3 runs against one
    ``WriteBuffer`` seeded from the items' own ``Started`` (no reads), and the writes go
    out together, guarded as ``_commit_trusted`` explains; on PostgreSQL that is ONE
    statement for the group (``tx.write_set``), where the reading group commit sends
    BEGIN, three reads, the writes and COMMIT. Any failed guard (a run cancelled, a
    lease reaped, a stage moved on) or an item the buffer does not carry raises, nothing
    written: the caller commits the group again with its reads (``_commit_together``),
    which decides each item as before. Two items of one run (a parallel group's stages)
    cannot both trust their copy of the run: such a group takes the reading path."""
    now = deps.clock.now()
    runs: dict[str, Run] = {}
    stages: dict[str, list[StageRun]] = {}
    jobs: dict[str, Job | None] = {}
    for item in group:
        s = item.started
        run_id = s.run.id
        if run_id in runs:
            raise NotBatchableError(f"two stages of run {run_id!r} in one group")
        runs[run_id] = s.run
        stages[run_id] = list(s.stages)
        jobs[s.job.id] = s.job
    results: list[c.JobExecuteResult | BaseException] = []
    chained: list[Started | None] = []
    async with deps.persistence.transaction() as tx:
        buffer = WriteBuffer(tx, runs, stages, jobs)
        buffer.guard_jobs()
        buffered, buffered_tx = buffer.stand_in(deps)
        for item in group:
            result, started = await _commit_in(buffered, buffered_tx, item, now)
            results.append(result)
            chained.append(started)
        if len(buffer.run_writes) != len(runs):  # a run neither locked nor version-checked
            raise NotBatchableError("an item of the group does not write its run")
        await buffer.flush(deps.job_transport, last=True)
    for item, started in zip(group, chained, strict=True):
        if started is not None:
            deps.chains.keep(started.job.id, item.cmd.worker_id, started)
    return results


async def _commit_together(deps: Deps, group: Sequence[_Commit]) -> list[c.JobExecuteResult]:
    now = deps.clock.now()
    run_ids = sorted({item.started.run.id for item in group})
    job_ids = [item.started.job.id for item in group]
    results: list[c.JobExecuteResult] = []
    chained: list[Started | None] = []
    async with deps.persistence.transaction() as tx:
        found_jobs = await deps.job_transport.get_many(tx, job_ids)
        runs = await tx.runs.get_many(run_ids, for_update=True)
        stages = await tx.stages.for_runs(run_ids)
        # The group's rows are read and its runs locked: the next group may start its
        # reads while this one writes and commits (it waits on the locks of any run the
        # two share, taken in id order by both, so they cannot deadlock).
        deps.commits.release()
        buffer = WriteBuffer(tx, runs, stages, {i: found_jobs.get(i) for i in job_ids})
        buffered, buffered_tx = buffer.stand_in(deps)
        for item in group:
            result, started = await _commit_in(buffered, buffered_tx, item, now)
            results.append(result)
            chained.append(started)
        await buffer.flush(deps.job_transport)
    for item, started in zip(group, chained, strict=True):
        if started is not None:
            deps.chains.keep(started.job.id, item.cmd.worker_id, started)
    return results


async def _commit_in(
    deps: Deps, tx: Transaction, item: _Commit, now: datetime
) -> tuple[c.JobExecuteResult, Started | None]:
    """Phase 3 inside ``tx``: the outcome, the transition, and (chaining) the start of
    the next stage. Returns the result and the chained start, to hand off after commit."""
    cmd, scope, s, ctx, outcome = item.cmd, item.scope, item.started, item.ctx, item.outcome
    run_id, stage_id = s.run.id, s.stage.stage_id
    chained: Started | None = None
    job = await deps.job_transport.get(tx, s.job.id)
    run = await tx.runs.get(run_id, for_update=True)
    # One read of all stages, under the run's lock: ours for the ownership check, the
    # rest for the transition (only this transaction changes ours from here on).
    stages = await tx.stages.for_run(run_id) if run is not None else []
    index = _index_of(stages, stage_id, s.index)
    stage = stages[index] if index >= 0 else None
    if not is_current(job, stage, run, s, cmd.worker_id):
        if ctx is not None and ctx.ai_calls is not None and ctx.ai_calls.calls:  # spent
            await tx.ai_calls.record(ctx.ai_calls.drain(failed=True))
        ghost = c.JobExecuteResult(
            outcome=cast("Any", outcome.kind),
            workflow_run_id=run_id,
            stage_id=stage_id,
            ghost=True,
            error="result discarded: run cancelled or stage taken over by another attempt",
        )
        await scope.complete(tx, ghost)
        return ghost, None
    assert stage is not None
    assert run is not None
    pending: list[EventBase] = []  # appended together with the transition's events
    result: c.JobExecuteResult | None = None  # completed: built last, with its chained job
    if outcome.kind == "completed":
        stage = await _commit_completed(deps, tx, scope, s, stage, outcome.output, now, pending)
    elif outcome.kind == "suspended":
        assert outcome.suspend is not None
        result, stage = await _commit_suspended(deps, tx, scope, s, stage, outcome.suspend, now)
    else:
        assert outcome.error is not None
        result, stage = await _commit_failed(deps, tx, scope, s, stage, outcome.error, now)
    stages = _replaced(stages, index, stage)
    # A groupable item has nothing else to write (``_groupable``): no second look at ctx.
    if not item.groupable and ctx is not None:
        if ctx.logs or ctx.annotations or ctx.recorded_ai_calls:
            if pending:  # their events follow the outcome's
                await tx.outbox.append(pending)
                pending = []
            await commit_stage_extras(
                deps, tx, run_id, stage_id, ctx, scope.causation_id, failed=outcome.kind == "failed"
            )
        if ctx.annotations:  # merged search attributes: the run moved on
            run = await load_run(tx, run_id)
    decided = decide(s.wf, run, stages)  # once: apply_transition takes it
    chain = cmd.chain and deps.chains.allows(cmd.worker_id) and decided.action == "advanced"
    decision, run = await apply_transition(
        deps,
        tx,
        run,
        stages,
        s.wf,
        now,
        scope.causation_id,
        lease_to=cmd.worker_id if chain else None,
        prior_events=() if chain else pending,
        decision=decided,
    )
    if decision.leased is not None:
        chained = await start_leased(
            deps, tx, scope, s.wf, run, stages, decision.leased, now, pending, hint=index + 1
        )
    elif chain and pending:
        # Nothing was chained after all (the next stage is on a queue this worker does not
        # serve, or remote): the outcome's events were held back for the chained start.
        await tx.outbox.append(pending)
    queued = 0
    if decision.action == "advanced" and decision.next_group is not None:
        queued = len(s.wf.groups[decision.next_group]) - (decision.leased is not None)
    if result is None:
        # ``construct``: the output was validated and dumped by ``validate_output``.
        result = construct(
            c.JobExecuteResult,
            {
                "outcome": "completed",
                "workflow_run_id": run_id,
                "stage_id": stage_id,
                "output": outcome.output,
                "chained_job": decision.leased,
                "queued_jobs": queued,
            },
        )
    elif decision.leased is not None or queued:
        result = evolve(result, {"chained_job": decision.leased, "queued_jobs": queued})
    if scope.key is not None:  # a chained stage's command has no key: no coroutine to make
        await scope.complete(tx, result)
    return result, chained


async def start_leased(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    wf: WorkflowDefinition,
    run: Run,
    stages: list[StageRun],
    job: Job,
    now: datetime,
    pending: Sequence[EventBase],
    *,
    fresh: bool = False,
    hint: int = -1,
) -> Started:
    """Phase 1 of ``job``'s stage, in the transaction that enqueued the job leased to its
    worker (a chained commit, or a chained ``run.claimPending``): what ``phase_start``
    would commit after a dequeue, without either round trip. Its ``stage:started`` is
    appended in one go after the caller's ``pending`` events."""
    assert job.worker_id is not None
    index = _index_of(stages, job.stage_id, hint)  # hint: the next stage of a sequence
    assert index >= 0  # the transition enqueued a stage of this run
    definition = wf.stage(job.stage_id)
    assert definition is not None  # the transition enqueued a stage of this workflow
    stage = await tx.stages.update(_running(stages[index], job, now))
    await tx.outbox.append([*pending, _started_event(stage, job.worker_id, now, scope)])
    stages = _replaced(stages, index, stage)
    return Started(job, run, stage, wf, definition, stages, fresh, index)


async def _commit_completed(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    s: Started,
    stage: StageRun,
    output: JsonValue,
    now: datetime,
    pending: list[EventBase],
) -> StageRun:
    """The stage COMPLETED and its job done; ``stage:completed`` goes to ``pending``, for
    the caller to append with whatever the transition adds. The caller builds the result
    once it knows the chained job, so the result is made once, not made and copied."""
    stage = await tx.stages.update(
        evolve(
            stage,
            {
                "status": _STAGE_COMPLETED,
                "output": output,
                "completed_at": now,
                "suspended_state": None,
                "next_poll_at": None,
            },
        )
    )
    await deps.job_transport.complete(tx, s.job.id)
    fields = stage.__dict__  # one read through pydantic's ``__getattr__`` hook
    started_at = fields["started_at"]
    pending.append(
        construct(  # the kernel's own values, as in ``_started_event``
            StageCompleted,
            {
                "workflow_run_id": fields["workflow_run_id"],
                "timestamp": now,
                "causation_id": scope.causation_id,
                "stage_id": fields["stage_id"],
                "attempt": fields["attempt"],
                "output": output,
                "duration": now - started_at if started_at else None,
            },
        )
    )
    return stage


async def _commit_suspended(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    s: Started,
    stage: StageRun,
    suspend: Suspend,
    now: datetime,
) -> tuple[c.JobExecuteResult, StageRun]:
    next_poll = now + suspend.poll_interval
    stage = await tx.stages.update(
        evolve(
            stage,
            {
                "status": StageStatus.SUSPENDED,
                "suspended_state": suspend.state,
                "next_poll_at": next_poll,
                "poll_interval": suspend.poll_interval,
                "suspend_deadline": now + suspend.max_wait,
            },
        )
    )
    await deps.job_transport.suspend(tx, s.job.id, next_poll)
    await tx.outbox.append(
        [
            StageSuspended(
                workflow_run_id=stage.workflow_run_id,
                timestamp=now,
                causation_id=scope.causation_id,
                stage_id=stage.stage_id,
                next_poll_at=next_poll,
            )
        ]
    )
    result = c.JobExecuteResult(
        outcome="suspended",
        workflow_run_id=stage.workflow_run_id,
        stage_id=stage.stage_id,
        next_poll_at=next_poll,
    )
    return result, stage


async def _commit_failed(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    s: Started,
    stage: StageRun,
    error: BaseException,
    now: datetime,
) -> tuple[c.JobExecuteResult, StageRun]:
    policy = s.definition.retry
    message = describe_exception(error)
    trace = short_traceback(error)
    retry = policy.allows_another(stage.attempt, error)
    retry_at = now + policy.delay_after(
        stage.attempt, error, seed=f"{stage.workflow_run_id}:{stage.stage_id}"
    )
    if retry:
        stage = await tx.stages.update(
            evolve(
                stage,
                {
                    "status": StageStatus.PENDING,
                    "error": message,
                    "error_traceback": trace,
                    "retryable": True,
                },
            )
        )
        await deps.job_transport.requeue(tx, s.job.id, retry_at, error=message)
        await tx.outbox.append(
            [
                StageFailed(
                    workflow_run_id=stage.workflow_run_id,
                    timestamp=now,
                    causation_id=scope.causation_id,
                    stage_id=stage.stage_id,
                    attempt=stage.attempt,
                    error=message,
                    will_retry=True,
                    retry_at=retry_at,
                    traceback=trace,
                )
            ]
        )
    else:
        stage = await fail_stage_for_good(
            deps, tx, stage, s.job.id, message, now, scope.causation_id, traceback=trace
        )
    result = c.JobExecuteResult(
        outcome="failed",
        workflow_run_id=stage.workflow_run_id,
        stage_id=stage.stage_id,
        error=message,
        retryable=retry,
        next_poll_at=retry_at if retry else None,
    )
    return result, stage


async def release_after_error(deps: Deps, cmd: c.JobExecute, exc: BaseException) -> None:
    """Best effort after an unexpected error: ``settle_lease`` requeues the job with
    backoff, or fails it (and its stage) when attempts are exhausted. If storage is down
    too, the host's ``job.release`` (retried until storage answers) or, failing that,
    ``lease.reapStale`` does the same later."""
    message = describe_exception(exc)
    try:
        async with deps.persistence.transaction() as tx:
            job = await deps.job_transport.get(tx, cmd.job_id)
            if job is None or job.status is not JobStatus.LEASED or job.worker_id != cmd.worker_id:
                return
            await settle_lease(
                deps,
                tx,
                job,
                end="errored",
                message=message,
                now=deps.clock.now(),
                causation_id=None,
            )
    except Exception as second:
        deps.logger.error(
            "job.release_failed",
            job_id=cmd.job_id,
            error=describe_exception(second),
            cause=message,
        )
