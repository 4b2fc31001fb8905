"""Fork a code-workflow run: a new run that reuses its source's journal up to a step.

The code-workflow counterpart of ``run.rerunFrom``. A pipeline rerun resets stages of
the *same* run; a code workflow's body replays its journal from the top, so the
natural repair is a *new* run, with the same workflow and input, whose journal holds
the source's entries strictly before the first position of the chosen step. Its body
replays those (their functions are not called) and runs the step and everything after
it afresh, under the code version registered now.

What is copied, in one transaction with the new run, its stage and ``workflow:created``:

* every journal entry before the cut: step results (a step that failed for good stays
  failed, so replay raises ``StepFailedError`` again), ``now`` / ``uuid`` values,
  published values, completed sleeps, and signal / update / review waits with the
  payload or decision they received;
* the inbox messages those waits consumed, already consumed, so the fork's journal
  points at its own inbox (an update answered *after* the cut records its new reply on
  the fork's copy, never on the source's message).

Not copied: timers (every wait before the cut is over), signals the source consumed at
or after the cut and those still unconsumed (the fork waits for new ones), and the
source's idempotency key (the fork has none). A wait still unfinished before the cut
cannot be reused and is refused.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING

from treadle.kernel.errors import (
    InvalidStateError,
    NotSupportedError,
    StepNotFoundError,
    TreadleValidationError,
)
from treadle.kernel.events import WorkflowCreated
from treadle.kernel.handlers.basics import load_run
from treadle.kernel.model import (
    RESERVED_ATTRIBUTES,
    IdempotencyRecord,
    IdempotencyState,
    Run,
    StageRun,
    evolve,
)
from treadle.kernel.workflows.model import ForkResult, InboxMessage, JournalEntry, JournalStatus

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps
    from treadle.ports import Transaction

FORKED_FROM = "forked_from"
"""Search attribute of a fork: its source run's id (``Engine.list(attributes=...)``)."""
FORKED_FROM_STEP = "forked_from_step"
"""Search attribute of a fork: ``name#occurrence`` of the step it runs afresh from."""

FORK_OPERATION = "run.fork"
"""The ``command_type`` under which a fork's idempotency key is recorded (``fork`` is a
kernel operation, not one of the binding commands)."""

_OCCURRENCE = re.compile(r"^(?P<name>.+)#(?P<occurrence>[1-9][0-9]*)$")
_REUSABLE = (JournalStatus.COMPLETED, JournalStatus.FAILED, JournalStatus.CANCELLED)
"""Finished entries; ``CANCELLED`` is a ``ctx.race`` loser, which a replay skips."""


def _check_step(from_step: object) -> str:
    if not isinstance(from_step, str) or not from_step:
        raise TreadleValidationError(
            f"from_step: must be a non-empty step name, got {from_step!r}",
            [("from_step", "must be a non-empty string")],
        )
    return from_step


def _cut(journal: list[JournalEntry], run: Run, from_step: str) -> JournalEntry:
    """The journal entry of the step to run afresh: ``name`` is its first occurrence,
    ``name#n`` its n-th (unless a step is literally called ``name#n``)."""
    steps = [e for e in journal if e.kind == "step"]
    wanted: list[tuple[str, int]] = [(from_step, 1)]
    match = _OCCURRENCE.match(from_step)
    if match is not None:
        wanted.append((match["name"], int(match["occurrence"])))
    for name, occurrence in wanted:
        for entry in steps:
            if (entry.name, entry.occurrence) == (name, occurrence):
                return entry
    known = ", ".join(dict.fromkeys(repr(e.name) for e in steps)) or "none"
    raise StepNotFoundError(
        f"from_step: run {run.id!r} of workflow {run.workflow_id!r} has no step "
        f"{from_step!r} in its journal (steps it reached: {known})"
    )


async def fork_run(
    deps: Deps, run_id: str, from_step: str, *, idempotency_key: str | None = None
) -> ForkResult:
    """Create the fork of ``run_id`` from ``from_step`` (module docstring). Unknown run:
    ``RunNotFoundError``; a pipeline run: ``NotSupportedError`` (use ``rerun_from``);
    a step the journal does not hold: ``StepNotFoundError``. Nothing is written then.
    With ``idempotency_key``, a repeated call returns the first call's fork."""
    from_step = _check_step(from_step)
    now = deps.clock.now()
    async with deps.persistence.transaction() as tx:
        # Locking the source serialises its forks, so two calls with one key cannot both
        # miss the other's record.
        source = await load_run(tx, run_id)
        if idempotency_key is not None:
            record = await tx.idempotency.get(idempotency_key, FORK_OPERATION)
            if record is not None and record.state is IdempotencyState.COMPLETED:
                return ForkResult.model_validate(record.result)
        wf = deps.workflow(source.workflow_id)
        if wf.kind != "code":
            raise NotSupportedError(
                f"fork applies to code workflows; run {source.id!r} is a stage pipeline "
                f"({wf.id!r}): use rerun_from(run_id, stage_id) instead"
            )
        journal = await tx.journal.entries(source.id)
        cut = _cut(journal, source, from_step)
        reused = [e for e in journal if e.position < cut.position]
        for entry in reused:
            if entry.status not in _REUSABLE:
                raise InvalidStateError(
                    f"cannot fork run {source.id!r} from {cut.describe()}: "
                    f"{entry.describe()} before it is still {entry.status.value}"
                )
        label = f"{cut.name}#{cut.occurrence}"
        # Deep copies: values read from the source are written anew for the fork (a
        # storage adapter may otherwise reuse the source's offloaded payload by identity).
        run = Run(
            id=deps.ids.new_id(),
            workflow_id=wf.id,
            workflow_version=wf.version,
            input=wf.validate_input(copy.deepcopy(source.input)),
            config=copy.deepcopy(source.config),
            priority=source.priority,
            search_attributes={
                **{
                    k: v
                    for k, v in source.search_attributes.items()
                    if k not in RESERVED_ATTRIBUTES  # a fork is no link of a chain
                },
                FORKED_FROM: source.id,
                FORKED_FROM_STEP: label,
            },
            created_at=now,
            updated_at=now,
        )
        await tx.runs.insert(run)
        await tx.stages.insert_many(
            [
                StageRun(workflow_run_id=run.id, stage_id=stage.id, execution_group=index)
                for index, group in enumerate(wf.groups)
                for stage in group
            ]
        )
        await _copy_entries(tx, source.id, run.id, reused)
        await tx.outbox.append(
            [
                WorkflowCreated(
                    workflow_run_id=run.id,
                    timestamp=now,
                    workflow_id=wf.id,
                    priority=run.priority,
                    forked_from=source.id,
                    forked_from_step=label,
                )
            ]
        )
        result = ForkResult(
            workflow_run_id=run.id,
            forked_from=source.id,
            from_step=cut.name,
            occurrence=cut.occurrence,
            copied_entries=len(reused),
        )
        if idempotency_key is not None:
            await tx.idempotency.put(
                IdempotencyRecord(
                    key=idempotency_key,
                    command_type=FORK_OPERATION,
                    state=IdempotencyState.COMPLETED,
                    result=result.model_dump(mode="json"),
                    started_at=now,
                )
            )
    return result


async def _copy_entries(
    tx: Transaction, source_id: str, fork_id: str, entries: list[JournalEntry]
) -> None:
    """Insert ``entries`` into the fork's journal, with the inbox messages they consumed
    copied into its inbox and their ``message_id`` pointing at the copies."""
    inbox: dict[int | None, InboxMessage] = {m.id: m for m in await tx.inbox.for_run(source_id)}
    answered = {
        e.result.get("update_id")
        for e in entries
        if e.kind == "reply" and isinstance(e.result, dict)
    }
    for entry in entries:
        result = copy.deepcopy(entry.result)
        if isinstance(result, dict) and isinstance(result.get("message_id"), int):
            message = inbox.get(result["message_id"])
            if message is not None:
                stored = await tx.inbox.insert(
                    evolve(
                        message,
                        {
                            "id": None,
                            "workflow_run_id": fork_id,
                            "payload": copy.deepcopy(message.payload),
                            # An update answered after the cut is answered anew by the fork.
                            "reply": copy.deepcopy(message.reply)
                            if message.update_id in answered
                            else None,
                        },
                    )
                )
                result["message_id"] = stored.id
        await tx.journal.insert(
            evolve(
                entry,
                {
                    "id": None,
                    "workflow_run_id": fork_id,
                    "version": 0,
                    "result": result,
                    "input": copy.deepcopy(entry.input),
                },
            )
        )
