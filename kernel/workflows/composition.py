"""Composition inside a code workflow body: ``ctx.all``, ``ctx.race`` and ``ctx.child``.

Replay needs every durable call at the same journal position on every activation.
``all`` and ``race`` run each argument (one ``ctx`` call) as its own task, created in
argument order; every ``ctx`` call reserves its position synchronously, before its first
``await``, so the tasks reserve positions in argument order whatever finishes first.
A branch that has to wait keeps its waits on its ``Branch`` instead of unwinding the
body, so its siblings still reach their own boundaries; the combinator then decides:

* ``all`` waits for every branch. If any still waits, the body unwinds with all the
  waits merged (the run suspends until the first of them is due, then replays: finished
  branches return from the journal). Once all have settled, the first failure in
  argument order is raised, else the results are returned in argument order.
* ``race`` journals its own ``race`` entry first. The first branch to settle (a value or
  an error) wins: the others are cancelled, their journal entries become CANCELLED (a
  loser's timer is disarmed, a loser child run is cancelled), and the ``race`` entry
  records the winner's index in the same transaction. A replay of a decided race runs
  the winner only; the losers reserve their positions and stop, so the same winner
  returns even when a loser's outcome would be available by then.

``child`` journals a ``child`` entry and creates the child run in the same transaction,
with a run id derived from the parent's id and the entry's position, so a crash between
that commit and the next activation finds the entry and never creates a second child.
The body waits (no worker held) until the child ends; ``kernel.workflows.children``
completes the entry and wakes the parent in the transaction that ends the child.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from treadle.kernel.errors import ChildWorkflowFailedError, OutputValidationError
from treadle.kernel.events import ChildStarted
from treadle.kernel.model import JsonValue
from treadle.kernel.workflows.model import ChildStart, JournalEntry, JournalStatus
from treadle.kernel.workflows.waits import (
    CURRENT_BRANCH,
    Branch,
    Interrupt,
    SkippedBranch,
    Wait,
    check_name,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.kernel.events import EventBase


class _ChildLookup(Protocol):
    def child_workflow(self, workflow_id: str) -> WorkflowDefinition: ...


class Composed(Protocol):
    """What the combinators need of the ``WorkflowContext`` running them: its journal
    position bookkeeping and commits. (A protocol, so this module stays below
    ``context``, whose ``ctx.all`` / ``ctx.race`` / ``ctx.child`` call it; mypy checks
    that ``WorkflowContext`` conforms where it passes itself.)"""

    @property
    def run_id(self) -> str: ...
    @property
    def workflow_id(self) -> str: ...
    @property
    def interrupt(self) -> Interrupt | None: ...
    @property
    def _writer(self) -> _ChildLookup: ...
    @property
    def _now(self) -> Callable[[], datetime]: ...
    @property
    def _by_position(self) -> Mapping[int, JournalEntry]: ...
    @property
    def _commit_lock(self) -> asyncio.Lock: ...
    def _stop(self, interrupt: Interrupt) -> Interrupt: ...
    def _suspend(self, wait: Wait) -> Interrupt: ...
    def _reserve(self, kind: str, name: str) -> tuple[int, str, int, JournalEntry | None]: ...
    def _entry(
        self, position: int, key: str, occurrence: int, kind: str, **fields: Any
    ) -> JournalEntry: ...
    async def _commit(
        self,
        entries: Sequence[JournalEntry],
        events: Sequence[EventBase] = (),
        *,
        consume: Sequence[tuple[int, str]] = (),
        replies: Sequence[tuple[int, JsonValue]] = (),
        start_children: Sequence[ChildStart] = (),
    ) -> None: ...
    async def commit_locked(
        self,
        entries: Sequence[JournalEntry],
        events: Sequence[EventBase] = (),
        *,
        consume: Sequence[tuple[int, str]] = (),
        replies: Sequence[tuple[int, JsonValue]] = (),
        start_children: Sequence[ChildStart] = (),
        cancel_children: Sequence[str] = (),
    ) -> None: ...


@dataclass
class _Outcome:
    kind: Literal["value", "error", "waiting", "stopped", "skipped"]
    value: Any = None
    error: Exception | None = None

    @property
    def settled(self) -> bool:
        return self.kind in ("value", "error")


def _check_branches(ctx: Composed, what: str, awaitables: Sequence[Any]) -> None:
    """Refuse (closing every coroutine, so none is left never awaited) what cannot be
    replayed deterministically: a non-coroutine argument, or nesting."""
    problem = None
    if CURRENT_BRANCH.get() is not None:
        problem = f"ctx.{what} cannot be an argument of another ctx.all / ctx.race"
    for index, awaitable in enumerate(awaitables):
        if problem is None and not inspect.iscoroutine(awaitable):
            problem = (
                f"ctx.{what} argument {index} must be a ctx call such as ctx.step(...), "
                f"got {awaitable!r}"
            )
    if problem is None:
        return
    for awaitable in awaitables:
        if inspect.iscoroutine(awaitable):
            awaitable.close()
    raise TypeError(f"workflow {ctx.workflow_id!r}: {problem}")


async def _run_branch(ctx: Composed, branch: Branch, awaitable: Awaitable[Any]) -> _Outcome:
    CURRENT_BRANCH.set(branch)  # this task's own context: siblings never see it
    try:
        value = await awaitable
    except SkippedBranch:
        return _Outcome("skipped")
    except Interrupt as interrupt:
        return _Outcome("waiting" if interrupt.reason == "suspend" else "stopped")
    except Exception as exc:
        outcome = _Outcome("error", error=exc)
    else:
        outcome = _Outcome("value", value)
    if branch.position is None and outcome.kind == "value":
        misuse = ValueError(
            f"workflow {ctx.workflow_id!r}: argument {branch.index} of ctx.all / ctx.race "
            "made no ctx call; pass ctx.step(...), ctx.child(...), ctx.sleep(...) and the like"
        )
        ctx._stop(Interrupt("fatal", error=misuse))
        return _Outcome("stopped")
    return outcome


def _start(
    ctx: Composed, awaitables: Sequence[Any], skip: int | None = None
) -> tuple[list[Branch], list[asyncio.Task[_Outcome]]]:
    """One task per argument, created in argument order (so positions are reserved in
    that order); with ``skip``, every argument but that one only reserves its position."""
    branches = [
        Branch(index, skip=skip is not None and index != skip) for index in range(len(awaitables))
    ]
    tasks = [
        asyncio.create_task(_run_branch(ctx, branch, awaitable))
        for branch, awaitable in zip(branches, awaitables, strict=True)
    ]
    return branches, tasks


async def _cancel(tasks: Sequence[asyncio.Future[_Outcome]]) -> None:
    live = [t for t in tasks if not t.done()]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)


def _outcomes(tasks: Sequence[asyncio.Future[_Outcome]]) -> list[_Outcome]:
    """Each task's outcome; a ``BaseException`` that escaped a branch (a simulated
    crash) propagates as it would from a plain ``await``."""
    return [_Outcome("stopped") if t.cancelled() else t.result() for t in tasks]


def _unwind_if_stopped(ctx: Composed) -> None:
    if ctx.interrupt is not None:
        raise ctx.interrupt


def _unwind_if_waiting(ctx: Composed, branches: Sequence[Branch]) -> None:
    waits = [wait for branch in branches for wait in branch.waits]
    if waits:
        raise ctx._stop(Interrupt("suspend", waits=waits))


async def gather_all(ctx: Composed, awaitables: Sequence[Any]) -> list[Any]:
    """``ctx.all`` (module docstring)."""
    _check_branches(ctx, "all", awaitables)
    if not awaitables:
        return []
    branches, tasks = _start(ctx, awaitables)
    try:
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if ctx.interrupt is not None:
                break  # lost the run or not deterministic: stop the siblings
    finally:
        await _cancel(tasks)
    outcomes = _outcomes(tasks)
    _unwind_if_stopped(ctx)
    _unwind_if_waiting(ctx, branches)
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
    return [outcome.value for outcome in outcomes]


async def race_first(ctx: Composed, awaitables: Sequence[Any], name: str) -> tuple[int, Any]:
    """``ctx.race`` (module docstring): ``(index, value)`` of the first branch to settle."""
    _check_branches(ctx, "race", awaitables)
    if not awaitables:
        raise ValueError(f"workflow {ctx.workflow_id!r}: ctx.race needs at least one argument")
    try:
        position, key, occurrence, entry = ctx._reserve("race", name)
    except BaseException:
        for awaitable in awaitables:
            awaitable.close()
        raise
    decided = None
    if entry is not None and entry.status is JournalStatus.COMPLETED:
        decided = int(entry.result["winner"]) if isinstance(entry.result, dict) else None
    branches, tasks = _start(ctx, awaitables, skip=decided)
    winner: int | None = decided
    try:
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if ctx.interrupt is not None:
                break
            if decided is None:
                settled = [i for i, t in enumerate(tasks) if t.done() and t.result().settled]
                if settled:
                    winner = settled[0]
                    break
        if decided is None and winner is not None and ctx.interrupt is None:
            async with ctx._commit_lock:  # no loser commits once the winner is known
                await _cancel(tasks)
                await _decide(ctx, branches, winner, position, key, occurrence)
    finally:
        await _cancel(tasks)
    outcomes = _outcomes(tasks)
    _unwind_if_stopped(ctx)
    if winner is None:
        _unwind_if_waiting(ctx, branches)
        raise AssertionError("race: no branch settled and none waits")  # pragma: no cover
    won = outcomes[winner]
    if won.kind == "waiting":  # a decided race whose winner waits again: not expected
        _unwind_if_waiting(ctx, [branches[winner]])
    if won.error is not None:
        raise won.error
    return winner, won.value


async def _decide(
    ctx: Composed,
    branches: Sequence[Branch],
    winner: int,
    position: int,
    key: str,
    occurrence: int,
) -> None:
    """Journal the winner and cancel the losers, in one transaction."""
    now = ctx._now()
    losers: list[JournalEntry] = []
    children: list[str] = []
    for branch in branches:
        if branch.index == winner:
            continue
        if branch.position is None:  # it would reserve later on replay: positions would move
            misuse = ValueError(
                f"workflow {ctx.workflow_id!r}: argument {branch.index} of ctx.race made no ctx "
                "call before the race was decided; pass ctx.step(...), ctx.sleep(...) and the like"
            )
            raise ctx._stop(Interrupt("fatal", error=misuse))
        lost = ctx._by_position.get(branch.position)
        if lost is None or lost.status is JournalStatus.CANCELLED:
            continue
        if lost.kind == "child" and lost.status is JournalStatus.WAITING:
            children.append(str((lost.input or {}).get("child_run_id")))
        losers.append(
            lost.model_copy(update={"status": JournalStatus.CANCELLED, "completed_at": now})
        )
    decision = ctx._entry(
        position,
        key,
        occurrence,
        "race",
        status=JournalStatus.COMPLETED,
        result={"winner": winner, "branches": len(branches)},
        completed_at=now,
    )
    await ctx.commit_locked([decision, *losers], cancel_children=children)


# -- child workflows -----------------------------------------------------------------------
def child_run_id(parent_run_id: str, position: int) -> str:
    """Deterministic: the same parent position always names the same child run."""
    return f"{parent_run_id}.child-{position}"


def _output_adapter(wf: WorkflowDefinition) -> TypeAdapter[Any] | None:
    """A child's run output is its last group's output: typed when that group is one
    stage (a code workflow's body, or a pipeline ending in one stage)."""
    last = wf.groups[-1]
    return last[0].output_adapter if len(last) == 1 else None


async def await_child(
    ctx: Composed,
    workflow_id: str,
    input: Any,
    config: Mapping[str, Any] | None,
) -> Any:
    """``ctx.child`` (module docstring)."""
    position, key, occurrence, entry = ctx._reserve(
        "child", check_name(workflow_id, "child workflow")
    )
    wf = ctx._writer.child_workflow(workflow_id)  # WorkflowNotFoundError, naming it
    if entry is None:
        input_json = wf.validate_input(input)  # InvalidInputError naming the field
        config_json = wf.validate_config(config)
        run_id = child_run_id(ctx.run_id, position)
        now = ctx._now()
        waiting = ctx._entry(
            position,
            key,
            occurrence,
            "child",
            status=JournalStatus.WAITING,
            input={"child_run_id": run_id, "workflow_id": workflow_id},
        )
        started = ChildStarted(
            workflow_run_id=ctx.run_id,
            timestamp=now,
            child_run_id=run_id,
            child_workflow_id=workflow_id,
            occurrence=occurrence,
        )
        spec = ChildStart(run_id, workflow_id, input_json, config_json)
        await ctx._commit([waiting], [started], start_children=[spec])
        entry = ctx._by_position[position]
    run_id = str((entry.input or {}).get("child_run_id"))
    if entry.status is JournalStatus.WAITING:
        child_wait: dict[str, JsonValue] = {"child_run_id": run_id}  # for ``waiting_for`` only
        raise ctx._suspend(Wait("child", position, key, occurrence, None, details=child_wait))
    result = entry.result if isinstance(entry.result, dict) else {}
    status = str(result.get("status", "CANCELLED"))  # no result: a race loser
    if status != "COMPLETED":
        error = result.get("error")
        raise ChildWorkflowFailedError(run_id, workflow_id, status, str(error) if error else None)
    adapter = _output_adapter(wf)
    if adapter is None:
        return result.get("output")
    try:
        return adapter.validate_python(result.get("output"))
    except PydanticValidationError as exc:
        raise OutputValidationError.from_pydantic(
            f"child workflow {workflow_id!r} run {run_id!r} output does not match its model",
            exc,
            prefix="output",
        ) from None
