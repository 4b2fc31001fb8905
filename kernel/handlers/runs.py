"""Run lifecycle handlers: create, claim, transition, cancel, rerun from a stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import treadle.kernel.commands as c
import treadle.kernel.flow_control as flow
from treadle.kernel.context import artifact_prefix
from treadle.kernel.errors import (
    ConcurrencyError,
    DuplicateError,
    InvalidConfigError,
    InvalidStateError,
    NotSupportedError,
    StageNotFoundError,
    TreadleValidationError,
    WorkflowNotFoundError,
    describe_exception,
)
from treadle.kernel.events import EventBase, WorkflowCancelled, WorkflowCreated, WorkflowStarted
from treadle.kernel.handlers.admission import admit_runs, any_limited
from treadle.kernel.handlers.basics import enqueue_stages, load_run
from treadle.kernel.handlers.common import apply_transition, fail_run, run_ended
from treadle.kernel.handlers.jobs import start_leased
from treadle.kernel.handlers.workflows import code_workflow, deliver, validate_signal
from treadle.kernel.handlers.write_buffer import NotBatchableError, WriteBuffer
from treadle.kernel.limits import validate_attributes
from treadle.kernel.model import (
    RESERVED_ATTRIBUTES,
    Job,
    JobStatus,
    JsonValue,
    MissingPayload,
    Run,
    RunStatus,
    StageRun,
    StageStatus,
    evolve,
)
from treadle.kernel.workflows.continuation import current_run
from treadle.kernel.workflows.deadline import arm as arm_execution_timeout
from treadle.kernel.workflows.deadline import request as request_execution_timeout
from treadle.kernel.workflows.saga import compensate_on_cancel

if TYPE_CHECKING:
    from datetime import datetime

    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps, Scope
    from treadle.ports import Transaction


def validate_run(
    wf: WorkflowDefinition,
    input: JsonValue,
    config: Mapping[str, JsonValue],
    search_attributes: Mapping[str, JsonValue],
) -> tuple[JsonValue, dict[str, JsonValue]]:
    """What ``run.create`` and ``run.createMany`` check of a new run of ``wf`` before they
    write anything: input and config against the workflow's models (their JSON forms
    are returned, defaults filled in) and the search attributes."""
    input_json = wf.validate_input(input)
    config_json = wf.validate_config(config)
    validate_attributes(search_attributes, field="search_attributes")
    reserved = sorted(RESERVED_ATTRIBUTES.intersection(search_attributes))
    if reserved:
        raise TreadleValidationError(
            f"search_attributes: {reserved[0]!r} is set by Treadle (continue-as-new links)",
            [(f"search_attributes.{reserved[0]}", "reserved search attribute")],
        )
    return input_json, config_json


def _new_run(
    deps: Deps,
    wf: WorkflowDefinition,
    spec: c.RunCreate | c.RunCreateItem,
    input_json: JsonValue,
    config_json: dict[str, JsonValue],
    now: datetime,
) -> Run:
    return Run(
        id=spec.run_id or deps.ids.new_id(),
        workflow_id=wf.id,
        workflow_version=wf.version,
        input=input_json,
        config=config_json,
        priority=spec.priority,
        idempotency_key=spec.idempotency_key,
        parent_run_id=spec.parent_run_id if isinstance(spec, c.RunCreate) else None,
        search_attributes=dict(spec.search_attributes),
        concurrency_key=spec.concurrency_key,
        trace_context=spec.trace_context,
        created_at=now,
        updated_at=now,
    )


def _new_stages(wf: WorkflowDefinition, run: Run) -> list[StageRun]:
    """A new run's stages, PENDING, in group then definition order."""
    return [
        StageRun(workflow_run_id=run.id, stage_id=stage.id, execution_group=index)
        for index, group in enumerate(wf.groups)
        for stage in group
    ]


def _created(run: Run, causation_id: str | None, now: datetime) -> WorkflowCreated:
    return WorkflowCreated(
        workflow_run_id=run.id,
        timestamp=now,
        causation_id=causation_id,
        workflow_id=run.workflow_id,
        priority=run.priority,
    )


async def create(deps: Deps, cmd: c.RunCreate, scope: Scope) -> c.RunCreateResult:
    """Validate input and config *before* opening a transaction, so bad input writes
    nothing; then insert the run, its stages and ``workflow:created`` together."""
    wf = deps.workflow(cmd.workflow_id)
    if cmd.execution_timeout is not None and wf.kind != "code":
        raise NotSupportedError(
            f"execution_timeout is not supported for stage pipeline {wf.id!r} (code workflows only)"
        )
    input_json, config_json = validate_run(wf, cmd.input, cmd.config, cmd.search_attributes)
    signal_payload = None
    if cmd.signal is not None:
        if wf.kind != "code":
            raise NotSupportedError(
                f"signal-with-start is not supported for stage pipeline {wf.id!r}"
            )
        signal_payload = validate_signal(
            code_workflow(wf, "signal-with-start"), cmd.signal.name, cmd.signal.payload
        )
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        # Signal-with-start is not replayed from the idempotency cache: its key names the
        # run to signal, and every call must deliver its signal.
        cached = await scope.claim(tx) if cmd.signal is None else None
        if cached is not None:
            first = cast("c.RunCreateResult", cached)
            if cmd.idempotency_key is not None:
                found = await tx.runs.get(first.workflow_run_id, for_update=False)
                if found is not None:
                    _warn_if_reused(deps, cmd.idempotency_key, found, input_json, config_json)
            # A replay created nothing: the cached result says what the first call did.
            return first.model_copy(update={"created": False}) if first.created else first
        existing = None
        if cmd.idempotency_key is not None:
            existing = await tx.runs.find_by_key(wf.id, cmd.idempotency_key)
            if existing is not None:
                _warn_if_reused(deps, cmd.idempotency_key, existing, input_json, config_json)
        if existing is None and cmd.signal is not None and cmd.run_id is not None:
            existing = await tx.runs.get(cmd.run_id)
        if existing is not None:
            if cmd.signal is not None:  # to the chain's newest run (continue-as-new)
                existing = await current_run(tx, await load_run(tx, existing.id), for_update=True)
                await _deliver(deps, tx, existing, cmd, signal_payload, now)
            result = c.RunCreateResult(
                workflow_run_id=existing.id, status=existing.status, created=False
            )
            if cmd.signal is None:
                await scope.complete(tx, result)
            return result
        run = _new_run(deps, wf, cmd, input_json, config_json, now)
        stages = _new_stages(wf, run)
        created = _created(run, scope.causation_id, now)
        claim_for = cmd.claim_for if cmd.signal is None else None
        if claim_for is not None and not (
            deps.chains.allows(claim_for)
            and deps.chains.serves(claim_for, wf.queue_of(wf.groups[0][0].id))
            and not flow.limited(wf)
        ):
            # That worker is stopping, or does not serve the first stage's queue, or the
            # workflow's limits decide when it starts: the run waits PENDING for a claim
            # (``run.claimPending`` admits it and queues the stage for its workers).
            claim_for = None
        started: list[Any] = []
        budget = cmd.max_cost if cmd.max_cost is not None else wf.max_cost
        if claim_for is not None and cmd.execution_timeout is None:
            # Nothing follows the inserts without a budget to set or a result to cache.
            last = budget is None and scope.key is None
            started = await _insert_claimed(
                deps, tx, scope, run, stages, claim_for, created, now, last=last
            )
        if started:
            pass  # inserted as claimed and started (PostgreSQL: one statement, insert_set)
        elif claim_for is not None:
            # In-process start: claim the run for the caller's worker in this same
            # commit and start its first stage there (no claim transaction, no wake-up).
            await _insert_new(tx, run, stages, cmd, now)
            fresh = stages if cmd.execution_timeout is None else None  # else a timer to read
            _, started = await _claim_runs(
                deps, tx, claim_for, scope, [run], 1, now, prior_events=[created], fresh=fresh
            )
        elif cmd.execution_timeout is not None or not await _insert_set(
            deps,
            tx,
            [run],
            [],
            stages,
            [created],
            last=budget is None and scope.key is None and cmd.signal is None,
        ):
            await _insert_new(tx, run, stages, cmd, now)
            await tx.outbox.append([created])
        if budget is not None:
            await tx.ai_calls.set_budget(run.id, budget)
        if cmd.signal is not None:
            await _deliver(deps, tx, run, cmd, signal_payload, now)
        status = RunStatus.RUNNING if claim_for is not None else run.status
        result = c.RunCreateResult(workflow_run_id=run.id, status=status)
        if cmd.signal is None:
            await scope.complete(tx, result)  # cached without the hand-off below
    if started:  # only once their start has committed
        deps.chains.keep(started[0].job.id, claim_for or "", started[0])
        result = c.RunCreateResult(
            workflow_run_id=run.id, status=status, chained_job=started[0].job
        )
    return result


def _warn_if_reused(
    deps: Deps, key: str, run: Run, input_json: JsonValue, config_json: dict[str, JsonValue]
) -> None:
    """An idempotency key names an existing run, which the caller gets back unchanged
    (documented: the first run wins). When this start asked for a different input or
    config, that is almost always a bug in the caller (a key reused across orders), and
    nothing else would tell them: log a warning naming the key and what differs. An
    offloaded value whose blob is gone is not compared, nor a run that continues a chain
    (``ctx.continue_as_new`` handed it the key with the input the body chose)."""
    if run.continued_from is not None:
        return
    differs = [
        name
        for name, stored, given in (
            ("input", run.input, input_json),
            ("config", run.config, config_json),
        )
        if type(stored) is not MissingPayload and stored != given
    ]
    if differs:
        deps.logger.warning(
            "run.idempotency_key_reused",
            idempotency_key=key,
            workflow_id=run.workflow_id,
            run_id=run.id,
            differs=",".join(differs),
            message=(
                f"idempotency key {key!r} already names run {run.id!r}, started with a "
                f"different {' and '.join(differs)}; returning that run unchanged"
            ),
        )


async def _insert_new(
    tx: Transaction, run: Run, stages: list[StageRun], cmd: c.RunCreate, now: datetime
) -> None:
    """The new run PENDING and its stages, as any ``run.create`` writes them."""
    await tx.runs.insert(run)
    if cmd.execution_timeout is not None:
        await request_execution_timeout(tx, run, cmd.execution_timeout, now)
    await tx.stages.insert_many(stages)


async def _insert_set(
    deps: Deps,
    tx: Transaction,
    runs: Sequence[Run],
    jobs: Sequence[Job],
    stages: Sequence[StageRun],
    events: Sequence[EventBase],
    *,
    last: bool,
) -> bool:
    """New runs with their jobs, stages and events as one unit where the adapter can
    (``tx.insert_set``, ``ports/persistence/write_set.py``; PostgreSQL: one statement,
    with ``last`` the whole transaction in one round trip). ``False``: nothing written,
    the caller makes the per-kind inserts."""
    insert_set = getattr(tx, "insert_set", None)
    return insert_set is not None and bool(
        await insert_set(
            deps.job_transport, runs=runs, new_jobs=jobs, stages=stages, events=events, last=last
        )
    )


async def _insert_claimed(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    run: Run,
    stages: list[StageRun],
    worker_id: str,
    created: EventBase,
    now: datetime,
    *,
    last: bool = False,
) -> list[Any]:
    """An in-process start (``claim_for``) of a run without timers, written as the claim
    leaves it: the claim runs against a ``WriteBuffer`` holding the new run and stages
    (nothing read, nothing written yet), and its result is inserted once, run RUNNING,
    first job leased, first stage RUNNING, events: four statements instead of a PENDING
    insert and the claim's updates (and no ``NOTIFY`` of a claimable run, which no other
    worker could take). Returns the started stage to hand off, or ``[]`` when the claim
    needs more than the buffer carries (a workflow's execution timeout: a timer): then
    the caller inserts and claims as usual, nothing having been written. ``last``: the
    caller writes nothing after it in this transaction (``insert_set``'s ``last``)."""
    buffer = WriteBuffer(tx, {run.id: run}, {run.id: list(stages)}, {})
    buffered, buffered_tx = buffer.stand_in(deps)
    try:
        _, started = await _claim_runs(
            buffered,
            buffered_tx,
            worker_id,
            scope,
            [run],
            1,
            now,
            prior_events=[created],
            fresh=stages,
        )
    except NotBatchableError:
        return []
    claimed_run, claimed_stages = buffer.written_state(run.id)
    # One unit where the adapter can (PostgreSQL: one statement, with ``last`` the
    # whole transaction in one round trip): ``ports/persistence/write_set.py``.
    if await _insert_set(
        deps, tx, [claimed_run], buffer.new_jobs, claimed_stages, buffer.events, last=last
    ):
        return started
    await tx.runs.insert(claimed_run)
    await deps.job_transport.enqueue(tx, buffer.new_jobs)
    await tx.stages.insert_many(claimed_stages)
    await tx.outbox.append(buffer.events)
    return started


async def create_many(deps: Deps, cmd: c.RunCreateMany, scope: Scope) -> c.RunCreateManyResult:
    """``run.create`` for a batch, in one transaction of set-oriented statements.

    Every item is validated first; a bad one rejects the batch, naming its index, and
    nothing is written. Then one lookup of the items' idempotency keys, one insert of
    the new runs, one of their stages, one append of their ``workflow:created`` events.
    An item whose key names an existing run, or an earlier item of the batch, gets that
    run with ``created=False``, as ``run.create`` would one item at a time."""
    if not cmd.items:
        return c.RunCreateManyResult(runs=[])
    checked = validate_items(deps, cmd.items)
    now = deps.clock.now()
    try:
        return await _create_batch(deps, cmd, scope, checked, now)
    except DuplicateError:
        if not any(item.idempotency_key for item in cmd.items):
            raise
        # Another transaction inserted a run with one of these keys after the lookup (on
        # PostgreSQL; SQLite and memory admit one writer): once more, it is found now.
        return await _create_batch(deps, cmd, scope, checked, now)


_Checked = tuple["WorkflowDefinition", JsonValue, dict[str, JsonValue]]


def validate_items(deps: Deps, items: Sequence[c.RunCreateItem]) -> list[_Checked]:
    """``validate_run`` for each item; the first bad one raises its error again with its
    fields prefixed by ``items[i].`` (``Engine.start_many`` checks a call of several
    batches with it before the first is sent)."""
    checked: list[_Checked] = []
    workflows: dict[str, WorkflowDefinition | None] = {}  # one registry lookup per id
    for index, item in enumerate(items):
        if item.workflow_id not in workflows:
            workflows[item.workflow_id] = deps.find_workflow(item.workflow_id)
        wf = workflows[item.workflow_id]
        if wf is None:
            raise WorkflowNotFoundError(
                f"items[{index}].workflow_id: workflow {item.workflow_id!r} is not registered "
                "(nothing was written)"
            )
        try:
            input_json, config_json = validate_run(
                wf, item.input, item.config, item.search_attributes
            )
        except TreadleValidationError as exc:
            raise _item_error(index, exc) from None
        checked.append((wf, input_json, config_json))
    return checked


def _item_error(index: int, exc: TreadleValidationError) -> TreadleValidationError:
    """``exc`` (same class) for item ``index`` of a batch: ``items[3].input.name: ...``."""
    prefix = f"items[{index}]"
    errors = [(f"{prefix}.{path}", problem) for path, problem in exc.errors]
    detail = "; ".join(f"{path}: {problem}" for path, problem in errors) or prefix
    return type(exc)(f"{detail} ({exc.message}); nothing was written", errors)


async def _create_batch(
    deps: Deps,
    cmd: c.RunCreateMany,
    scope: Scope,
    checked: list[_Checked],
    now: datetime,
) -> c.RunCreateManyResult:
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunCreateManyResult", cached)
        keys = [
            (wf.id, item.idempotency_key)
            for item, (wf, _, _) in zip(cmd.items, checked, strict=True)
            if item.idempotency_key is not None
        ]
        known = await tx.runs.find_by_keys(keys) if keys else {}
        results, new = _plan(deps, cmd.items, checked, known, now)
        if new:
            runs = [run for run, _ in new]
            stages = [stage for run, wf in new for stage in _new_stages(wf, run)]
            events = [_created(run, scope.causation_id, now) for run, _ in new]
            budgets = any(wf.max_cost is not None for _, wf in new)
            if not await _insert_set(
                deps, tx, runs, [], stages, events, last=not budgets and scope.key is None
            ):
                await tx.runs.insert_many(runs)
                await tx.stages.insert_many(stages)
                await tx.outbox.append(events)
            for run, wf in new:  # the workflow's AI budget (a batch item has none of its own)
                if wf.max_cost is not None:
                    await tx.ai_calls.set_budget(run.id, wf.max_cost)
        result = c.RunCreateManyResult(runs=results)
        await scope.complete(tx, result)
    return result


def _plan(
    deps: Deps,
    items: Sequence[c.RunCreateItem],
    checked: list[_Checked],
    known: dict[tuple[str, str], Run],
    now: datetime,
) -> tuple[list[c.RunCreateResult], list[tuple[Run, WorkflowDefinition]]]:
    """Item by item, as ``run.create`` would go: a key that names a run (stored, or made
    by an earlier item) gets that run; any other item makes a new one. Returns the
    results in item order and the new runs with their workflows."""
    known = dict(known)
    results: list[c.RunCreateResult] = []
    new: list[tuple[Run, WorkflowDefinition]] = []
    taken: dict[str, int] = {}
    for index, (item, (wf, input_json, config_json)) in enumerate(zip(items, checked, strict=True)):
        key = (wf.id, item.idempotency_key or "")
        found = known.get(key) if item.idempotency_key is not None else None
        if found is not None:
            assert item.idempotency_key is not None
            _warn_if_reused(deps, item.idempotency_key, found, input_json, config_json)
            results.append(
                c.RunCreateResult(workflow_run_id=found.id, status=found.status, created=False)
            )
            continue
        run = _new_run(deps, wf, item, input_json, config_json, now)
        if run.id in taken:
            raise TreadleValidationError(
                f"items[{index}].run_id: {run.id!r} is the run id of items[{taken[run.id]}] "
                "too (nothing was written)",
                [(f"items[{index}].run_id", "repeats the run id of an earlier item")],
            )
        taken[run.id] = index
        if item.idempotency_key is not None:
            known[key] = run
        new.append((run, wf))
        results.append(c.RunCreateResult(workflow_run_id=run.id, status=run.status))
    return results, new


async def _deliver(
    deps: Deps, tx: Transaction, run: Run, cmd: c.RunCreate, payload: Any, now: datetime
) -> None:
    """Signal-with-start: the signal joins the run's inbox in the same transaction."""
    assert cmd.signal is not None
    await deliver(
        deps,
        tx,
        run,
        deps.workflow(run.workflow_id, run.workflow_version),
        cmd.signal.name,
        payload,
        None,
        now,
        cmd.idempotency_key,
    )


def _refuse_code_workflow(wf: WorkflowDefinition) -> None:
    if wf.kind == "code":
        raise NotSupportedError(
            f"rerun_from does not apply to code workflow {wf.id!r}: its body replays its "
            "journal from the top; fork the run from a step instead "
            "(Engine.fork(run_id, from_step), `treadle fork RUN_ID --from-step NAME`)"
        )


async def claim_pending(
    deps: Deps, cmd: c.RunClaimPending, scope: Scope
) -> c.RunClaimPendingResult:
    """Mark up to ``max_claims`` PENDING runs RUNNING and enqueue their group 0 jobs
    in the same transaction, so a crash can neither orphan nor lose a job.

    With ``chain`` (and a worker that has not stopped chaining), the first group-0 job of
    up to ``chain`` runs is created leased to the claimer and its stage started here, as
    a chained ``job.execute`` commit starts the next stage: the claimer's execution needs
    no lease and no phase-1 transaction (the started state waits in ``deps.chains``)."""
    now = deps.clock.now()
    budget = cmd.chain if deps.chains.allows(cmd.worker_id) else 0
    if scope.key is None and getattr(deps.persistence, "claim_reads", False):
        try:
            unlocked = await _claim_unlocked(deps, cmd, scope, budget, now)
        except ConcurrencyError as exc:  # a run moved on after the read: nothing written
            deps.logger.debug("claim.unlocked_fallback", reason=str(exc))
        else:
            if unlocked is not None:
                return unlocked
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunClaimPendingResult", cached)
        runs = await tx.runs.claim_pending(cmd.max_claims)
        admission = None
        if runs and any_limited(deps, runs):
            admission = await admit_runs(deps, tx, runs, cmd.max_claims, now)
            runs = admission.admitted
        if any(type(run.input) is MissingPayload for run in runs):
            runs = await _fail_lost_inputs(deps, tx, runs, now, scope.causation_id)
        claimed: list[c.ClaimedRun] | None = None
        if deps.settings.group_commit and len(runs) > 1:
            # All runs' reads in one statement, their writes collected and flushed one
            # statement per kind (``write_buffer``); a run the buffer cannot carry (a code
            # workflow's timers) sends the whole claim down the plain path below, in the
            # same transaction: the buffer has written nothing yet.
            buffer = WriteBuffer(
                tx,
                {run.id: run for run in runs},
                await tx.stages.for_runs([run.id for run in runs]),
                {},
            )
            buffered, buffered_tx = buffer.stand_in(deps)
            try:
                claimed, started = await _claim_runs(
                    buffered, buffered_tx, cmd.worker_id, scope, runs, budget, now
                )
            except NotBatchableError:
                claimed = None
            else:
                await buffer.flush(deps.job_transport)
        if claimed is None:
            claimed, started = await _claim_runs(deps, tx, cmd.worker_id, scope, runs, budget, now)
        result = c.RunClaimPendingResult(
            claimed=claimed,
            chained_jobs=[s.job for s in started],
            deferred=admission.deferred if admission is not None else 0,
            retry_at=admission.retry_at if admission is not None else None,
        )
        await scope.complete(tx, result)
    for s in started:  # only once their start has committed
        deps.chains.keep(s.job.id, cmd.worker_id, s)
    return result


async def _claim_unlocked(
    deps: Deps, cmd: c.RunClaimPending, scope: Scope, budget: int, now: datetime
) -> c.RunClaimPendingResult | None:
    """The claim in two statements without ``BEGIN``/``COMMIT`` (PostgreSQL): one read of
    the candidates with their stages (``tx.claim_candidates``, no lock held past it),
    then every write at once (``WriteBuffer.flush``: ``tx.write_set``), guarded by the
    run and stage versions read. A run claimed, cancelled or paused in between fails
    the write as a whole (``ConcurrencyError``, nothing written): the caller claims
    again under locks. ``None``, having written nothing, when this claim needs what
    the buffer does not carry (a concurrency or rate limit to admit under its keys'
    locks, a lost input to fail, a timer to read): the caller claims under locks.
    Nothing to claim costs the one read."""
    async with deps.persistence.transaction() as tx:
        read = getattr(tx, "claim_candidates", None)
        found = await read(cmd.max_claims) if read is not None else None
        if found is None:
            return None
        runs, stages, timed = found
        if runs and (
            any_limited(deps, runs)
            or any(type(run.input) is MissingPayload for run in runs)
            or (len(runs) > 1 and not deps.settings.group_commit)
        ):
            return None
        buffer = WriteBuffer(tx, {run.id: run for run in runs}, stages, {})
        buffered, buffered_tx = buffer.stand_in(deps)
        try:
            claimed, started = await _claim_runs(
                buffered, buffered_tx, cmd.worker_id, scope, runs, budget, now, timed=timed
            )
        except NotBatchableError:
            return None
        if buffer.run_writes:
            # The flush is all this claim writes: one statement, sent without BEGIN/COMMIT.
            await buffer.flush(deps.job_transport, last=True)
        result = c.RunClaimPendingResult(claimed=claimed, chained_jobs=[s.job for s in started])
    for s in started:  # only once their start has committed
        deps.chains.keep(s.job.id, cmd.worker_id, s)
    return result


async def _fail_lost_inputs(
    deps: Deps, tx: Transaction, runs: list[Run], now: datetime, causation_id: str | None
) -> list[Run]:
    """Fail, instead of starting, each run whose input was offloaded and its blob is gone
    (storage read it as a ``MissingPayload``): its error names the run and the key. Returns
    the runs left to claim, so the lost input of one run never stops the claim of others."""
    kept: list[Run] = []
    for run in runs:
        if type(run.input) is not MissingPayload:
            kept.append(run)
            continue
        error = describe_exception(run.input.error())
        deps.logger.warning("claim.payload_missing", run_id=run.id, error=error)
        await fail_run(deps, tx, run, await tx.stages.for_run(run.id), error, now, causation_id)
    return kept


async def _claim_runs(
    deps: Deps,
    tx: Transaction,
    worker_id: str,
    scope: Scope,
    runs: list[Run],
    budget: int,
    now: datetime,
    *,
    prior_events: list[EventBase] | None = None,
    fresh: list[StageRun] | None = None,
    timed: set[str] | None = None,
) -> tuple[list[c.ClaimedRun], list[Any]]:
    """Start each of ``runs`` inside ``tx``: RUNNING, group 0 enqueued (the first job of
    up to ``budget`` runs leased to the claimer, ``worker_id``, and started). Returns the
    claimed runs and the started stages to hand off once ``tx`` commits.
    ``prior_events``: appended with the first run's own (``run.create`` claiming the
    run it just created commits one ``append_events``). ``fresh``: the stages of the one
    run, created by this transaction with no timers, so nothing of it needs reading (and
    its first activation, for a code workflow, knows its journal is empty). ``timed``:
    the runs known to have timers (read with the runs); a run not in it has none, so
    arming its execution timeout reads none."""
    claimed: list[c.ClaimedRun] = []
    started: list[Any] = []
    for run in runs:
        wf = deps.find_workflow(run.workflow_id, run.workflow_version)
        if wf is None:
            # Left PENDING for a worker that has this workflow (rolling deploys).
            deps.logger.warning(
                "claim.skipped_unknown_workflow", run_id=run.id, workflow_id=run.workflow_id
            )
            continue
        run = await tx.runs.update(
            evolve(
                run,
                {
                    "status": RunStatus.RUNNING,
                    "started_at": now,
                    "updated_at": now,
                    "worker_id": worker_id,
                    "current_group": 0,
                },
            )
        )
        known = fresh is not None or (timed is not None and run.id not in timed)
        await arm_execution_timeout(tx, run, wf, now, pending=[] if known else None)
        stages = await tx.stages.for_run(run.id) if fresh is None else fresh
        group0 = [s for s in stages if s.execution_group == 0]
        lease_to = worker_id if budget > 0 and group0 else None
        jobs = await enqueue_stages(deps, tx, run, wf, group0, now, lease_to=lease_to)
        run_started = WorkflowStarted(
            workflow_run_id=run.id,
            timestamp=now,
            causation_id=scope.causation_id,
            workflow_id=run.workflow_id,
            worker_id=worker_id,
        )
        events: list[EventBase] = [*(prior_events or ()), run_started]
        prior_events = None
        if lease_to is not None and jobs[0].status is JobStatus.LEASED:
            budget -= 1
            started.append(
                await start_leased(
                    deps, tx, scope, wf, run, stages, jobs[0], now, events, fresh=fresh is not None
                )
            )
        else:
            await tx.outbox.append(events)
        claimed.append(
            c.ClaimedRun(
                workflow_run_id=run.id,
                workflow_id=run.workflow_id,
                job_ids=[j.id for j in jobs],
            )
        )
    return claimed, started


async def transition(deps: Deps, cmd: c.RunTransition, scope: Scope) -> c.RunTransitionResult:
    """Advance, complete or fail the run per the transition table. ``job.execute``
    already applies the same table inline, so this is usually a safe no-op."""
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunTransitionResult", cached)
        run = await load_run(tx, cmd.workflow_run_id)
        wf = deps.workflow(run.workflow_id, run.workflow_version)
        stages = await tx.stages.for_run(run.id)
        decision, _ = await apply_transition(deps, tx, run, stages, wf, now, scope.causation_id)
        action = "noop" if decision.action == "suspend" else decision.action
        result = c.RunTransitionResult(action=action, next_group=decision.next_group)
        await scope.complete(tx, result)
    return result


async def cancel(deps: Deps, cmd: c.RunCancel, scope: Scope) -> c.RunCancelResult:
    """Authoritative: the run and every non-terminal stage become CANCELLED and their
    jobs are cancelled now; a stage still executing becomes a ghost on commit. A run
    that continued as new stands for its chain: the chain's newest run is cancelled."""
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunCancelResult", cached)
        run = await current_run(tx, await load_run(tx, cmd.workflow_run_id), for_update=True)
        if run.status.terminal:
            result = c.RunCancelResult(cancelled=False)
        else:
            await cancel_in(deps, tx, run, cmd.reason, scope.causation_id, now)
            result = c.RunCancelResult(cancelled=True)
        await scope.complete(tx, result)
    if result.cancelled:  # executions in this process see ctx.cancelled at once
        deps.inflight.cancel_run(run.id, cmd.reason or "cancelled")
    return result


async def cancel_in(
    deps: Deps,
    tx: Transaction,
    run: Run,
    reason: str | None,
    causation_id: str | None,
    now: datetime,
) -> None:
    """Cancel the non-terminal ``run`` (loaded ``for_update``) inside ``tx``: what
    ``run.cancel`` writes, for handlers that cancel a run as part of their own change (a
    schedule's ``cancel_previous``). The caller tells ``deps.inflight`` once committed."""
    for stage in await tx.stages.for_run(run.id):
        if not stage.status.terminal:
            await tx.stages.update(
                evolve(stage, {"status": StageStatus.CANCELLED, "completed_at": now})
            )
    await deps.job_transport.cancel_by_run(tx, run.id)
    # Sagas: a code workflow with compensations to run gets a compensating job.
    await compensate_on_cancel(deps, tx, run, now)
    await tx.runs.update(
        evolve(
            run,
            {
                "status": RunStatus.CANCELLED,
                "completed_at": now,
                "updated_at": now,
                "error": reason,
            },
        )
    )
    await tx.outbox.append(
        [
            WorkflowCancelled(
                workflow_run_id=run.id, timestamp=now, causation_id=causation_id, reason=reason
            )
        ]
    )
    await run_ended(deps, tx, await load_run(tx, run.id), now, causation_id)


async def start_in(
    deps: Deps,
    tx: Transaction,
    wf: WorkflowDefinition,
    spec: c.RunCreate,
    input_json: JsonValue,
    config_json: dict[str, JsonValue],
    causation_id: str | None,
    now: datetime,
) -> Run:
    """Insert a new PENDING run of ``wf`` (``spec`` validated by the caller with
    ``validate_run``), its stages and ``workflow:created`` inside ``tx``: what
    ``run.create`` writes, for handlers that start a run as part of their own change (a
    schedule's fire commits the run with the schedule's next fire time)."""
    run = _new_run(deps, wf, spec, input_json, config_json, now)
    await _insert_new(tx, run, _new_stages(wf, run), spec, now)
    await tx.outbox.append([_created(run, causation_id, now)])
    return run


def _rerun_config(
    wf: WorkflowDefinition,
    current: Mapping[str, JsonValue],
    cmd: c.RunRerunFrom,
    resettable: set[str],
) -> dict[str, JsonValue]:
    """The run's config after a rerun: ``cmd.config``'s stages replace theirs, validated as
    ``run.create`` validates (defaults filled, errors name ``config.<stage>``). A stage
    the rerun keeps cannot change config: its output was made under the old one."""
    if cmd.config is None:
        return dict(current)
    kept = sorted(set(cmd.config) & set(wf.stages) - resettable)
    if kept:
        raise InvalidConfigError(
            f"config names stage(s) {kept} that rerunning from {cmd.from_stage_id!r} keeps; "
            "rerun from the earliest stage whose config changes",
            [(f"config.{name}", "stage is not rerun") for name in kept],
        )
    return wf.validate_config({**current, **cmd.config})


async def rerun_from(deps: Deps, cmd: c.RunRerunFrom, scope: Scope) -> c.RunRerunFromResult:
    """Reset ``from_stage_id``, its unfinished siblings and every later stage; remove their
    outputs and artifacts; the run resumes from that stage's group."""
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunRerunFromResult", cached)
        run = await load_run(tx, cmd.workflow_run_id)
        wf = deps.workflow(run.workflow_id, run.workflow_version)
        _refuse_code_workflow(wf)
        if cmd.from_stage_id not in wf.stages:
            raise StageNotFoundError(f"workflow {wf.id!r} has no stage {cmd.from_stage_id!r}")
        if not run.status.terminal:
            raise InvalidStateError(
                f"run {run.id!r} is {run.status.value}; rerun needs a COMPLETED, FAILED or "
                "CANCELLED run (cancel it first)"
            )
        group = wf.group_of[cmd.from_stage_id]
        to_reset = [
            stage
            for stage in await tx.stages.for_run(run.id)
            if stage.execution_group > group
            or (
                stage.execution_group == group
                and (stage.stage_id == cmd.from_stage_id or not stage.status.succeeded)
            )
        ]
        config = _rerun_config(wf, run.config, cmd, {s.stage_id for s in to_reset})
        reset: list[StageRun] = []
        for stage in to_reset:
            fresh = StageRun(
                workflow_run_id=run.id,
                stage_id=stage.stage_id,
                execution_group=stage.execution_group,
                version=stage.version,
            )
            reset.append(await tx.stages.update(fresh))
        await deps.job_transport.cancel_by_run(tx, run.id)
        run = await tx.runs.update(
            evolve(
                run,
                {
                    "status": RunStatus.RUNNING,
                    "output": None,
                    "error": None,
                    "completed_at": None,
                    "updated_at": now,
                    "current_group": group,
                    "started_at": now,
                    "config": config,
                    "paused": False,  # a pause or terminate of its last life is over
                    "terminated": False,
                },
            )
        )
        await enqueue_stages(
            deps, tx, run, wf, [s for s in reset if s.execution_group == group], now
        )
        await tx.outbox.append(
            [
                WorkflowStarted(
                    workflow_run_id=run.id,
                    timestamp=now,
                    causation_id=scope.causation_id,
                    workflow_id=run.workflow_id,
                    rerun_from_stage_id=cmd.from_stage_id,
                )
            ]
        )
        result = c.RunRerunFromResult(
            workflow_run_id=run.id,
            from_stage_id=cmd.from_stage_id,
            deleted_stages=[s.stage_id for s in reset],
        )
        await scope.complete(tx, result)
    # Blob deletion cannot join the transaction; it runs after the commit so a rolled-back
    # rerun never loses artifacts of stages that keep their outputs.
    for stage_id in result.deleted_stages:
        for key in await deps.blob_store.list(artifact_prefix(run.id, stage_id)):
            await deps.blob_store.delete(key)
    return result
