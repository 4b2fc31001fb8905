"""Code-workflow commands: deliver a signal (``run.signal``), fire due timers (the
code-workflow branch of ``stage.pollSuspended``), and read published state.

A signal is appended to the run's inbox in arrival order. If the body is suspended
waiting for that name, the same transaction hands the oldest such message to the
waiting journal entry and wakes the run; otherwise it stays in the inbox until a
``wait_for_signal`` consumes it. Consumption is guarded in storage, so a message is
delivered at most once and, being committed with the journal entry, never lost.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import ValidationError as PydanticValidationError

import treadle.kernel.commands as c
from treadle.kernel.errors import (
    InvalidPayloadError,
    InvalidStateError,
    NotFoundError,
    NotSupportedError,
)
from treadle.kernel.events import (
    EventBase,
    ReviewDecided,
    SignalReceived,
    TimerFired,
    UpdateReceived,
)
from treadle.kernel.handlers.basics import load_run, new_jobs
from treadle.kernel.handlers.jobs import start_leased
from treadle.kernel.handlers.write_buffer import WriteBuffer
from treadle.kernel.limits import dump_json, precheck, to_json
from treadle.kernel.model import CONTINUED_AS, JsonValue, Run, RunStatus, StageStatus, evolve
from treadle.kernel.workflows.activation import wake, write_entries
from treadle.kernel.workflows.context import message_result
from treadle.kernel.workflows.continuation import MAX_FOLLOW, current_run
from treadle.kernel.workflows.deadline import forward_timers
from treadle.kernel.workflows.definition import WORKFLOW_STAGE_ID, CodeWorkflowDefinition
from treadle.kernel.workflows.model import InboxMessage, JournalStatus, journal_key
from treadle.kernel.workflows.versions import block, is_blocked, version_mismatch

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.deps import Deps, Scope
    from treadle.kernel.handlers.execution import Started
    from treadle.kernel.model import StageRun
    from treadle.ports import Transaction


def code_workflow(wf: WorkflowDefinition, what: str) -> CodeWorkflowDefinition:
    if wf.kind != "code" or not isinstance(wf, CodeWorkflowDefinition):
        raise NotSupportedError(
            f"{what} is not supported for stage pipelines (workflow {wf.id!r} is a {wf.kind})"
        )
    return wf


def validate_signal(
    wf: CodeWorkflowDefinition, name: str, payload: Any, *, kind: str = "signal"
) -> JsonValue:
    """Check a payload against the declared model of the signal (or update), if the
    workflow declares them; returns its JSON form, storable on every backend
    (``kernel.limits``). ``InvalidPayloadError`` names the field."""
    declared = wf.signals if kind == "signal" else wf.updates
    what = f"invalid payload for {kind} {name!r} of workflow {wf.id!r}"
    if not declared:
        return to_json(payload, "payload", InvalidPayloadError, what=what)
    adapter = declared.get(name)
    if adapter is None:
        raise InvalidPayloadError(
            f"workflow {wf.id!r} declares no {kind} {name!r} (declared: {sorted(declared)})",
            [("name", f"unknown {kind}")],
        )
    precheck(payload, "payload", InvalidPayloadError, what=what)
    try:
        value = adapter.validate_python(payload)
    except PydanticValidationError as exc:
        raise InvalidPayloadError.from_pydantic(what, exc, prefix="payload") from None
    return dump_json(adapter.serializer, value, "payload", InvalidPayloadError, what=what)


def _check_live(run: Run, name: str, kind: str = "signal") -> None:
    if run.status.terminal:
        raise InvalidStateError(
            f"cannot deliver {kind} {name!r} to run {run.id!r}: it is {run.status.value}"
        )


async def signal(deps: Deps, cmd: c.RunSignal, scope: Scope) -> c.RunSignalResult:
    """Validate before writing anything; then append, announce, and hand over if awaited."""
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)  # a replay answers even after the run ended
        if cached is not None:
            return cast("c.RunSignalResult", cached)
        run = await current_run(tx, await load_run(tx, cmd.workflow_run_id, for_update=False))
    _check_live(run, cmd.name)
    wf = code_workflow(deps.workflow(run.workflow_id, run.workflow_version), f"signal {cmd.name!r}")
    payload = validate_signal(wf, cmd.name, cmd.payload)
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.RunSignalResult", cached)
        run, wf, payload = await _locked_target(deps, tx, run, wf, payload, cmd)
        await deliver(
            deps, tx, run, wf, cmd.name, payload, cmd.idempotency_key, now, scope.causation_id
        )
        result = c.RunSignalResult(delivered=True)
        await scope.complete(tx, result)
    return result


async def _locked_target(
    deps: Deps,
    tx: Transaction,
    seen: Run,
    wf: CodeWorkflowDefinition,
    payload: JsonValue,
    cmd: c.RunSignal | c.RunUpdate,
    kind: Literal["signal", "update"] = "signal",
) -> tuple[Run, CodeWorkflowDefinition, JsonValue]:
    """The run to deliver to, locked: the chain's newest run (a message sent to a run
    that continued as new is forwarded, ``kernel.workflows.continuation``). When that is
    not the run validated against (it continued meanwhile), the payload is checked again
    against its definition."""
    run = await current_run(tx, await load_run(tx, seen.id), for_update=True)
    if run.id != seen.id and run.workflow_version != seen.workflow_version:
        wf = code_workflow(deps.workflow(run.workflow_id, run.workflow_version), kind)
        payload = validate_signal(wf, cmd.name, cmd.payload, kind=kind)
    return run, wf, payload


async def deliver(
    deps: Deps,
    tx: Transaction,
    run: Run,
    wf: WorkflowDefinition,
    name: str,
    payload: JsonValue,
    idempotency_key: str | None,
    now: datetime,
    causation_id: str | None,
    *,
    kind: Literal["signal", "update"] = "signal",
    update_id: str | None = None,
) -> InboxMessage:
    """Inside the caller's transaction, with ``run`` locked: append the message to the
    inbox, record ``signal:received`` (or ``update:received``), and hand it to the body if it is
    waiting for it (``run.signal``, signal-with-start and ``run.update`` share this)."""
    _check_live(run, name, kind)
    message = await tx.inbox.insert(
        InboxMessage(
            workflow_run_id=run.id,
            kind=kind,
            name=name,
            payload=payload,
            update_id=update_id,
            idempotency_key=idempotency_key,
            created_at=now,
        )
    )
    received: EventBase
    if kind == "signal":
        received = SignalReceived(
            workflow_run_id=run.id,
            timestamp=now,
            causation_id=causation_id,
            name=name,
            payload=payload,
        )
    else:
        assert update_id is not None
        received = UpdateReceived(
            workflow_run_id=run.id,
            timestamp=now,
            causation_id=causation_id,
            name=name,
            update_id=update_id,
            payload=payload,
        )
    await tx.outbox.append([received])
    stage = await tx.stages.get(run.id, WORKFLOW_STAGE_ID)
    if stage is not None and stage.status is StageStatus.SUSPENDED:
        await _hand_over(deps, tx, run.id, stage, message, wf, now)
    return message


async def _hand_over(
    deps: Deps,
    tx: Transaction,
    run_id: str,
    stage: StageRun,
    message: InboxMessage,
    wf: WorkflowDefinition,
    now: datetime,
) -> None:
    """A suspended body waiting for this message name takes the oldest such message."""
    key = journal_key(message.kind, message.name)
    waiting = [
        e
        for e in await tx.journal.entries(run_id, status=JournalStatus.WAITING)
        if e.kind == message.kind and e.name == key
    ]
    if not waiting:
        return
    entry = waiting[0]
    oldest = await tx.inbox.next_message(run_id, message.name, kind=message.kind)
    assert oldest is not None
    assert oldest.id is not None
    done = entry.model_copy(
        update={
            "status": JournalStatus.COMPLETED,
            "result": message_result(oldest),
            "completed_at": now,
        }
    )
    await write_entries(tx, [done], now)
    await tx.inbox.consume(oldest.id, now, f"{entry.name}#{entry.occurrence}")
    await wake(deps, tx, await load_run(tx, run_id), stage, wf, now)


async def update(deps: Deps, cmd: c.RunUpdate, scope: Scope) -> c.RunUpdateResult:
    """Deliver an update to the inbox (waking a body waiting for it) and return its
    ``update_id``; ``reply`` is set when the body has already answered (a replay of the
    same idempotency key). ``engine.update`` waits for the reply."""
    async with deps.persistence.transaction() as tx:
        cached = await _cached_update(tx, scope, cmd)  # a replay answers after the run ended
        if cached is not None:
            return cached
        run = await current_run(tx, await load_run(tx, cmd.workflow_run_id, for_update=False))
    _check_live(run, cmd.name, "update")
    wf = code_workflow(deps.workflow(run.workflow_id, run.workflow_version), f"update {cmd.name!r}")
    payload = validate_signal(wf, cmd.name, cmd.payload, kind="update")
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await _cached_update(tx, scope, cmd)
        if cached is not None:
            return cached
        run, wf, payload = await _locked_target(deps, tx, run, wf, payload, cmd, "update")
        update_id = deps.ids.new_id()
        await deliver(
            deps,
            tx,
            run,
            wf,
            cmd.name,
            payload,
            cmd.idempotency_key,
            now,
            scope.causation_id,
            kind="update",
            update_id=update_id,
        )
        result = c.RunUpdateResult(update_id=update_id)
        await scope.complete(tx, result)
    return result


async def _cached_update(
    tx: Transaction, scope: Scope, cmd: c.RunUpdate
) -> c.RunUpdateResult | None:
    cached = await scope.claim(tx)
    if cached is None:
        return None
    result = cast("c.RunUpdateResult", cached)
    done, reply = await update_reply_in(tx, cmd.workflow_run_id, result.update_id)
    return result.model_copy(update={"reply": reply}) if done else result


async def decide_review(deps: Deps, cmd: c.ReviewDecide, scope: Scope) -> c.ReviewDecideResult:
    """Record a reviewer's decision on a waiting ``ctx.review`` and wake the run. An
    unknown review id is ``NotFoundError``; a second decision is ``InvalidStateError``."""
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        cached = await scope.claim(tx)
        if cached is not None:
            return cast("c.ReviewDecideResult", cached)
        run = await load_run(tx, cmd.workflow_run_id)
        wf = code_workflow(
            deps.workflow(run.workflow_id, run.workflow_version),
            f"review decision for {cmd.review_id!r}",
        )
        reviews = [
            e
            for e in await tx.journal.entries(run.id)
            if e.kind == "review" and (e.input or {}).get("review_id") == cmd.review_id
        ]
        if not reviews:
            raise NotFoundError(f"run {run.id!r} has no review {cmd.review_id!r}")
        entry = reviews[0]
        if entry.status is not JournalStatus.WAITING:
            decided = entry.result.get("decision") if isinstance(entry.result, dict) else None
            raise InvalidStateError(
                f"review {cmd.review_id!r} of run {run.id!r} was already decided "
                f"({decided or 'timed_out'})"
            )
        _check_live(run, cmd.review_id, "review decision for")
        done = entry.model_copy(
            update={
                "status": JournalStatus.COMPLETED,
                "result": {
                    "review_id": cmd.review_id,
                    "decision": cmd.decision,
                    "reviewer": cmd.reviewer,
                    "comment": cmd.comment,
                },
                "completed_at": now,
            }
        )
        await write_entries(tx, [done], now)
        await tx.outbox.append(
            [
                ReviewDecided(
                    workflow_run_id=run.id,
                    timestamp=now,
                    causation_id=scope.causation_id,
                    review_id=cmd.review_id,
                    decision=cmd.decision,
                    reviewer=cmd.reviewer,
                )
            ]
        )
        stage = await tx.stages.get(run.id, WORKFLOW_STAGE_ID)
        if stage is not None and stage.status is StageStatus.SUSPENDED:
            await wake(deps, tx, run, stage, wf, now)
        result = c.ReviewDecideResult(recorded=True)
        await scope.complete(tx, result)
    return result


async def update_reply_in(tx: Transaction, run_id: str, update_id: str) -> tuple[bool, JsonValue]:
    """``(answered, reply)`` of an update."""
    message = await tx.inbox.find_update(run_id, update_id)
    hops, at = 0, run_id
    while message is None or (message.consumed_by or "").startswith(f"{CONTINUED_AS}:"):
        # Forwarded to, or moved to, a later run of the chain (continue-as-new).
        run = await tx.runs.get(at)
        if run is None or run.continued_as is None or hops >= MAX_FOLLOW:
            break
        at, hops = run.continued_as, hops + 1
        message = await tx.inbox.find_update(at, update_id) or message
    if message is None:
        raise NotFoundError(f"run {run_id!r} has no update {update_id!r}")
    reply = message.reply if isinstance(message.reply, dict) else None
    if reply is None or "value" not in reply:
        return False, None
    return True, reply["value"]


async def fire_timers(
    deps: Deps,
    scope: Scope,
    wf: WorkflowDefinition,
    seen: StageRun,
    now: datetime,
    *,
    lease_to: str | None = None,
) -> tuple[str, Started | None]:
    """For a suspended code-workflow stage whose earliest timer is due: fire every due
    timer (its wait completes in the journal, ``timer:fired`` is recorded) and wake the
    run. A run whose pinned version this worker lacks stays blocked and is re-checked
    later; a blocked run this worker can serve is woken. Returns ``resumed``, ``waiting``
    (nothing due after all, or still blocked) or ``skipped``, and the started activation
    when one was leased.

    ``lease_to``: the worker firing the timers, which serves the run's queue; the woken
    activation's job is created leased to it and the activation started in this same
    commit (``_wake_leased``), as a chained stage is: the caller hands the ``Started``
    to that worker (``deps.chains``), which executes it with no dequeue and no phase-1
    transaction. A worker that dies after this commit leaves a lease the reaper
    releases, as after any chained start."""
    async with deps.persistence.transaction() as tx:
        run = await tx.runs.get(seen.workflow_run_id, for_update=True)
        stage = await tx.stages.get(seen.workflow_run_id, seen.stage_id)
        if (
            run is None
            or stage is None
            or run.status.terminal
            or stage.status is not StageStatus.SUSPENDED
            or stage.version != seen.version
        ):
            return "skipped", None  # another poller, a signal or a cancel got there first
        if run.paused:  # fire nothing until run.resume, which polls the stage again
            await tx.stages.update(stage.model_copy(update={"next_poll_at": None}))
            return "waiting", None
        mismatch = version_mismatch(run, wf)
        if mismatch is not None:  # fire nothing: the journal stays as the pinned code left it
            await block(deps, tx, run, stage, wf, mismatch, now, scope.causation_id)
            return "waiting", None
        if is_blocked(stage):  # this worker has the pinned version: resume the body
            await wake(deps, tx, run, stage, wf, now)
            return "resumed", None
        timers = forward_timers(await tx.timers.pending(run.id))
        due = [t for t in timers if t.fire_at <= now]
        if not due:
            later = timers[0].fire_at if timers else None
            await tx.stages.update(stage.model_copy(update={"next_poll_at": later}))
            return "waiting", None
        events: list[EventBase] = []
        for timer in due:
            entry = await tx.journal.get(run.id, timer.name, timer.occurrence)
            if entry is not None and entry.status is JournalStatus.WAITING:
                result = {"timed_out": True} if timer.purpose.endswith("_timeout") else None
                done = entry.model_copy(
                    update={
                        "status": JournalStatus.COMPLETED,
                        "result": result,
                        "completed_at": now,
                    }
                )
                await write_entries(tx, [done], now)  # fires its timer, as below
            else:
                await tx.timers.fire(run.id, timer.name, timer.occurrence, now)
            events.append(
                TimerFired(
                    workflow_run_id=run.id,
                    timestamp=now,
                    causation_id=scope.causation_id,
                    step=timer.name,
                    occurrence=timer.occurrence,
                    purpose=timer.purpose,
                    fire_at=timer.fire_at,
                )
            )
        if lease_to is not None and deps.chains.serves(lease_to, wf.queue_of(WORKFLOW_STAGE_ID)):
            started = await _wake_leased(deps, tx, scope, run, stage, wf, now, lease_to, events)
            return "resumed", started
        await tx.outbox.append(events)
        await wake(deps, tx, run, stage, wf, now)
    return "resumed", None


async def _wake_leased(
    deps: Deps,
    tx: Transaction,
    scope: Scope,
    run: Run,
    stage: StageRun,
    wf: WorkflowDefinition,
    now: datetime,
    worker_id: str,
    events: list[EventBase],
) -> Started:
    """``wake`` with the new activation's job leased to ``worker_id`` and started in the
    same transaction (``start_leased``: stage RUNNING, ``stage:started`` appended after
    ``events``): the stage goes from SUSPENDED to RUNNING in one write, the job is
    never QUEUED (no ``NOTIFY``, no dequeue). A code workflow's only stage is the body's.

    The writes (job, run, stage, events) are collected in a ``WriteBuffer`` over the
    run and stage read under the run's lock, and flushed together: on PostgreSQL one
    statement (``tx.write_set``), elsewhere one per kind."""
    woken = evolve(
        stage, {"status": StageStatus.PENDING, "next_poll_at": None, "job_id": None, "error": None}
    )
    buffer = WriteBuffer(tx, {run.id: run}, {run.id: [woken]}, {})
    buffered, buffered_tx = buffer.stand_in(deps)
    (job,) = new_jobs(deps, run, wf, [WORKFLOW_STAGE_ID], now, lease_to=worker_id)
    await buffered.job_transport.enqueue(buffered_tx, [job])
    if run.status is RunStatus.SUSPENDED:
        # ``error`` of a live run is a version mismatch it was blocked by (versions.py).
        run = await buffered_tx.runs.update(
            evolve(run, {"status": RunStatus.RUNNING, "error": None, "updated_at": now})
        )
    started = await start_leased(buffered, buffered_tx, scope, wf, run, [woken], job, now, events)
    await buffer.flush(deps.job_transport)
    return started


async def query(deps: Deps, run_id: str, key: str) -> JsonValue:
    """The value the run last published under ``key`` (``None`` before its first
    ``ctx.publish``). Reads only; never wakes the run."""
    async with deps.persistence.transaction() as tx:
        run = await load_run(tx, run_id, for_update=False)
        code_workflow(deps.workflow(run.workflow_id, run.workflow_version), f"query {key!r}")
        entry = await tx.journal.latest(run.id, journal_key("publish", key))
    return entry.result if entry is not None else None
