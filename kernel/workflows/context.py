"""``WorkflowContext``: what a code workflow body sees, and the replay rules.

Every ``ctx`` call is a durable boundary with a ``position`` (the order the body
reached it) and a journal key ``(name, occurrence)``. On each activation the body
runs again from the top: a call whose outcome the journal holds returns it without
re-executing; the first call with nothing recorded runs (a step), or unwinds the
body so the run suspends (a sleep, a signal not yet arrived, a retry backoff).
Reaching a different call than the journal recorded at a position is a
``NonDeterminismError``.

``ctx.all``, ``ctx.race`` and ``ctx.child`` live in ``composition``: each argument of a
group runs as its own task with a ``Branch`` that records its one position and keeps
its waits, so siblings reach their own boundaries before the body unwinds.

The body unwinds through ``Interrupt``, a ``BaseException`` so that a body's
``except Exception`` cannot swallow a suspension; the context also remembers the
interrupt, so a body that swallows it anyway cannot get past its next ``ctx`` call.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import typing
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Literal,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeVar,
)

from pydantic import BaseModel, ConfigDict, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from treadle.kernel.ai import (
    CURRENT_AI_CALLS,
    DEFAULT_AI,
    AICall,
    AICallBuffer,
    AIServices,
    AITotals,
    TotalsReader,
)
from treadle.kernel.ai_helper import WorkflowAI
from treadle.kernel.context import CancellationToken
from treadle.kernel.definitions import WorkflowDefinition, _is_async
from treadle.kernel.errors import (
    InvalidPayloadError,
    NonDeterminismError,
    OutputValidationError,
    PayloadMissingError,
    StepFailedError,
    StepTimeoutError,
    TreadleValidationError,
    WaitTimeoutError,
    WorkflowError,
    as_body_failure,
    describe_exception,
    short_traceback,
)
from treadle.kernel.events import (
    AttributeSet,
    EventBase,
    StepCompleted,
    StepFailed,
    UpdateReplied,
)
from treadle.kernel.limits import (
    check_json,
    dump_json,
    precheck,
    to_duration,
    to_json,
)
from treadle.kernel.model import RESERVED_ATTRIBUTES, JsonValue, evolve
from treadle.kernel.retry import RetryPolicy
from treadle.kernel.text import text_problem
from treadle.kernel.workflows.compensation import Compensation, Saga
from treadle.kernel.workflows.composition import await_child, gather_all, race_first
from treadle.kernel.workflows.model import (
    ChildStart,
    InboxMessage,
    JournalEntry,
    JournalStatus,
    describe_call,
    journal_key,
)
from treadle.kernel.workflows.waits import (
    CURRENT_BRANCH,
    PARKED,
    Interrupt,
    SkippedBranch,
    Wait,
    check_name,
)

if TYPE_CHECKING:
    from treadle.ports.telemetry import AttemptSpan, AttributeValue

_WAITING = JournalStatus.WAITING

_LOCAL_KINDS = frozenset({"now", "uuid", "publish", "compensation", "compensate"})
"""Calls a compensating replay still makes: they record local facts (or run the
compensations themselves) rather than move the cancelled run forward."""

DEFAULT_STEP_RETRY = RetryPolicy()
"""A step without ``retry=``: three attempts, 1 s then 2 s apart."""

_ANY: TypeAdapter[Any] = TypeAdapter(Any)


@dataclass(frozen=True)
class StepInfo:
    """The step being executed, readable from inside its function as
    ``WorkflowContext.current_step()``; ``idempotency_key`` is stable across its retries."""

    name: str
    occurrence: int
    attempt: int
    idempotency_key: str
    cancelled: CancellationToken = field(default_factory=CancellationToken, compare=False)
    """Set when the run is cancelled (or its execution timeout passes) while the step
    runs: a long step should poll it and stop; its result would be discarded anyway."""


async def _no_totals() -> AITotals | None:
    return None


_CURRENT_STEP: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar(
    "treadle_current_step", default=None
)
"""Task-local (not global) state: set around each step function call."""


class JournalWriter(Protocol):
    """How the context reaches storage; implemented by the executor, which checks on
    every commit that this execution still owns the run."""

    paused: bool
    """The run was paused when a commit last looked (``run.pause``): start no new step."""
    span: AttemptSpan | None
    """The activation's span when tracing is on: steps are its children, waits its events."""

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
    ) -> list[JournalEntry]: ...

    async def peek_message(self, kind: str, name: str) -> InboxMessage | None: ...

    def child_workflow(self, workflow_id: str) -> WorkflowDefinition:
        """The registered definition of a child (``WorkflowNotFoundError`` if none)."""
        ...


class _ClosedWriter:
    """The writer of a dropped parked body (``WorkflowContext.close``): refuses all."""

    paused = False
    span: AttemptSpan | None = None

    async def commit(self, *args: Any, **kwargs: Any) -> list[JournalEntry]:
        raise Interrupt("ghost")

    async def peek_message(self, kind: str, name: str) -> InboxMessage | None:
        raise Interrupt("ghost")

    def child_workflow(self, workflow_id: str) -> WorkflowDefinition:
        raise Interrupt("ghost")


_CLOSED: JournalWriter = _ClosedWriter()


def _seconds(value: timedelta | float | None, what: str) -> float | None:
    """A timeout in seconds: positive, finite, at most ``limits.MAX_DURATION``."""
    if value is None:
        return None
    return to_duration(value, what).total_seconds()


def _check_attribute(key: Any, value: Any) -> None:
    """Search attributes are indexed and compared as JSON scalars on every adapter;
    ``continued_from`` / ``continued_as`` are Treadle's own (continue-as-new links)."""
    if key in RESERVED_ATTRIBUTES:
        raise TreadleValidationError(
            f"set_attribute: {key!r} is set by Treadle (continue-as-new links), not by a body",
            [("key", "reserved search attribute")],
        )
    if not isinstance(key, str) or not key or '"' in key or text_problem(key) is not None:
        raise TreadleValidationError(
            f"set_attribute: key must be a non-empty string without '\"', got {key!r}",
            [("key", "not a non-empty string without a double quote")],
        )
    if not isinstance(value, str | int | float | bool | None) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise TreadleValidationError(
            f"set_attribute {key!r}: value must be a string, a finite number, a boolean or "
            f"None, got {value!r}",
            [("value", "not a JSON scalar")],
        )
    check_json(value, "value", what=f"set_attribute {key!r}")


def _result_adapter(fn: Any) -> TypeAdapter[Any] | None:
    """From the function's return annotation, so a first execution and a replay return
    the same type (a model, not the dict it was journaled as)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return None
    if "return" not in hints:
        return None
    try:
        return TypeAdapter(hints["return"])
    except Exception:
        return None


def _encode(adapter: TypeAdapter[Any] | None, value: Any, name: str) -> JsonValue:
    """A step's result as the journal stores it: valid for its return annotation and
    storable on every backend (``kernel.limits``), else ``OutputValidationError``, which
    fails the step without a retry, as a stage's output that fails its model does."""
    what = f"step {name!r} returned a value that cannot be journaled"
    if adapter is None:
        return to_json(value, "result", OutputValidationError, what=what)
    precheck(value, "result", OutputValidationError, what=what)
    try:
        validated = adapter.validate_python(value)
    except PydanticValidationError as exc:
        raise OutputValidationError.from_pydantic(
            f"step {name!r} returned a value that does not match its return annotation",
            exc,
            prefix="result",
        ) from None
    return dump_json(adapter.serializer, validated, "result", OutputValidationError, what=what)


def _decode(adapter: TypeAdapter[Any] | None, raw: JsonValue) -> Any:
    return adapter.validate_python(raw) if adapter is not None else raw


async def _attempt(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    info: StepInfo,
    calls: AICallBuffer,
    seconds: float | None,
    limit: timedelta | float | None,
    name: str,
) -> Any:
    """One attempt of a step function, under its timeout if it has one."""
    pending = _invoke(fn, args, info, calls)
    if seconds is None:
        return await pending
    # In this task (not wait_for's own): see ``_invoke``.
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            return await pending
    except TimeoutError:
        if not deadline.expired():
            raise
        raise StepTimeoutError(
            f"step {name!r} attempt {info.attempt} exceeded its timeout of {limit}"
        ) from None


async def _invoke(
    fn: Callable[..., Any], args: tuple[Any, ...], info: StepInfo, calls: AICallBuffer
) -> Any:
    """Call the step function. A ``BaseException`` it raises that is no ``Exception``
    (``KeyboardInterrupt``, ``SystemExit``, a ``CancelledError`` of its own) becomes a
    ``BodyInterruptedError``: a failed attempt under the step's retry policy, which can
    neither kill the worker nor send the activation round forever. A cancellation of
    this task (the host stopping) and the body's own ``Interrupt`` go on up."""
    token = _CURRENT_STEP.set(info)
    calls_token = CURRENT_AI_CALLS.set(calls)
    try:
        if _is_async(fn):
            return await fn(*args)
        # to_thread copies the context, so current_step() works in sync steps too.
        return await asyncio.to_thread(fn, *args)
    except (Exception, Interrupt):
        raise
    except BaseException as exc:
        failure = as_body_failure(exc, f"step {info.name!r}")
        if failure is None:
            raise
        raise failure from None
    finally:
        CURRENT_AI_CALLS.reset(calls_token)
        _CURRENT_STEP.reset(token)


class _Park:
    """``await _Park()``: park the body until the next activation resumes it (sticky
    execution, ``kernel.workflows.sticky``); ``GeneratorExit`` if it is dropped instead."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, None]:
        yield PARKED


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _resumable(
    method: Callable[Concatenate[WorkflowContext, _P], Awaitable[_R]],
) -> Callable[Concatenate[WorkflowContext, _P], Coroutine[Any, Any, _R]]:
    """Sticky execution for a call the body makes itself (not a branch of ``all`` or
    ``race``): when the call would unwind the body to suspend, the body parks in it
    instead, and the next activation on this kernel makes the call again from the same
    position, over what the journal holds by then. Without sticky execution (or with an
    interrupt already pending) the call behaves as it always did."""

    @functools.wraps(method)
    async def call(self: WorkflowContext, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if (
            not self.sticky
            or self.interrupt is not None
            or self.compensating
            or CURRENT_BRANCH.get() is not None
        ):
            return await method(self, *args, **kwargs)
        while True:
            try:
                return await method(self, *args, **kwargs)
            except Interrupt as interrupt:
                if not self._may_park(interrupt):
                    raise
            await self._park()

    return call


class WorkflowContext:
    """The ``ctx`` of a code workflow body. See the module docstring for replay."""

    def __init__(
        self,
        *,
        run_id: str,
        workflow_id: str,
        version: str,
        journal: Sequence[JournalEntry],
        writer: JournalWriter,
        now: Callable[[], datetime],
        new_id: Callable[[], str],
        overrides: typing.Mapping[str, Callable[..., Any]] | None = None,
        cancelled: CancellationToken | None = None,
        compensating: bool = False,
        sticky: bool = False,
        ai: AIServices = DEFAULT_AI,
        ai_totals: TotalsReader | None = None,
    ) -> None:
        self.run_id = run_id
        self.workflow_id = workflow_id
        self.version = version
        self.interrupt: Interrupt | None = None
        self._writer = writer
        self._now = now
        self._new_id = new_id
        self._overrides = dict(overrides or {})
        self._by_position = {e.position: e for e in journal}
        self._waiting = {(e.name, e.occurrence) for e in journal if e.status is _WAITING}
        """Every entry of the run that may be WAITING in storage: those read or committed
        WAITING, until read or committed otherwise (only this run's activations make an
        entry WAITING; a signal, a timer or a child's end only move one on)."""
        self._by_key = {(e.name, e.occurrence): e for e in journal}
        self._last_recorded = max(self._by_position, default=-1)
        self._next_position = 0
        self._occurrences: dict[str, int] = {}
        self._pending: list[JournalEntry] = []
        self._pending_events: list[EventBase] = []
        self._cancelled = cancelled if cancelled is not None else CancellationToken()
        self.compensating = compensating
        """Replaying a cancelled run only to re-register its compensations: the first call
        whose outcome is not journaled unwinds the body (``Interrupt("cancelled")``)."""
        self.compensations: list[Compensation] = []
        """Compensations registered by ``saga.add`` so far in this activation, in order."""
        self._ai_services = ai
        self._ai_totals = ai_totals or _no_totals
        self._ai: WorkflowAI | None = None
        self._commit_lock = asyncio.Lock()
        """Branches of ``ctx.all`` commit one at a time, each in its own transaction."""
        self.sticky = sticky and not compensating
        """The body parks where it would unwind to suspend (``_resumable``); only a
        ``kernel.workflows.sticky.Body`` may drive it then."""
        self.parked_at: int | None = None
        """While parked: the position of the call it parked in, from which the next
        activation reads the journal again."""
        self.driver: asyncio.Task[Any] | None = None
        """The task driving the body in this activation: a call made in another task (a
        body wrapping a ``ctx`` call in ``asyncio.wait_for`` or ``gather``) cannot park."""
        self._kept_from = 0
        """Entries before this position are dropped from memory: the body parked past
        them, and nothing reads a passed position again."""

    # -- introspection ------------------------------------------------------------------
    @property
    def is_replaying(self) -> bool:
        """Whether the body is still re-reading recorded calls (use it to skip logging)."""
        return self._next_position <= self._last_recorded

    @staticmethod
    def current_step() -> StepInfo | None:
        """Inside a step function: its name, occurrence, attempt and idempotency key."""
        return _CURRENT_STEP.get()

    @property
    def ai(self) -> WorkflowAI:
        """AI calls: ``record`` inside a step (committed with the step's journal entry),
        ``generate_text`` / ``generate_object`` as journaled steps (``kernel/ai.py``)."""
        if self._ai is None:
            self._ai = WorkflowAI(self._ai_services, self._ai_totals, self.step, self._now)
        return self._ai

    @property
    def cancelled(self) -> CancellationToken:
        """Set when the run is cancelled or its execution timeout passes while this
        activation runs (the same token as ``current_step().cancelled``)."""
        return self._cancelled

    def saga(self) -> Saga:
        """A saga: ``saga.add(name, fn, *args)`` after each successful step registers its
        compensation; if the run then fails or is cancelled, the compensations run newest
        first, each as a durable step (``kernel.workflows.saga``)."""
        return Saga(self)

    @property
    def pending(self) -> list[JournalEntry]:
        """Recorded calls (``now``, ``uuid``, ``publish``, ``set_attribute``) not committed
        yet."""
        return self._pending

    @property
    def nothing_waiting(self) -> bool:
        """Whether no entry of the run can be WAITING in storage (the journal as this
        context read and committed it): a commit of the run's end needs no journal read
        to find waits (children) to settle."""
        return not self._waiting and not any(e.status is _WAITING for e in self._pending)

    @property
    def pending_events(self) -> list[EventBase]:
        """Events of the pending calls, committed with them."""
        return self._pending_events

    # -- plumbing -------------------------------------------------------------------------
    def _stop(self, interrupt: Interrupt) -> Interrupt:
        branch = CURRENT_BRANCH.get()
        if branch is not None and interrupt.reason == "suspend":
            branch.waits.extend(interrupt.waits)  # the combinator decides what unwinds
            return interrupt
        if self.interrupt is None:
            self.interrupt = interrupt
        elif self.interrupt.reason == "suspend" and interrupt.reason == "suspend":
            self.interrupt.waits.extend(interrupt.waits)
        return self.interrupt

    def _reserve(self, kind: str, name: str) -> tuple[int, str, int, JournalEntry | None]:
        """Give the call its position and occurrence; check them against the journal."""
        if self.interrupt is not None:
            raise self.interrupt
        position = self._next_position
        self._next_position += 1
        key = journal_key(kind, name)
        occurrence = self._occurrences.get(key, 0) + 1
        self._occurrences[key] = occurrence
        entry = self._by_position.get(position)
        found = None
        if entry is not None and (entry.name, entry.occurrence, entry.kind) != (
            key,
            occurrence,
            kind,
        ):
            found = f"the journal recorded {entry.describe()} there"
        elif entry is None and (key, occurrence) in self._by_key:
            other = self._by_key[(key, occurrence)]
            found = f"the journal recorded it at position {other.position}"
        if found is not None:
            error = NonDeterminismError(
                f"workflow {self.workflow_id!r} run {self.run_id!r} is not deterministic: at "
                f"position {position} the body reached {describe_call(kind, key, occurrence)}, "
                f"but {found}"
            )
            raise self._stop(Interrupt("fatal", error=error))
        branch = CURRENT_BRANCH.get()
        if branch is not None:
            if branch.position is not None:
                misuse = ValueError(
                    f"workflow {self.workflow_id!r}: each argument of ctx.all / ctx.race must be "
                    f"one ctx call (ctx.step, ctx.child, ctx.sleep, ...); argument "
                    f"{branch.index} reached a second one, {describe_call(kind, key, occurrence)}"
                )
                raise self._stop(Interrupt("fatal", error=misuse))
            branch.position, branch.key, branch.occurrence = position, key, occurrence
            if branch.skip:  # a decided race's loser: never runs, not even to compensate
                raise SkippedBranch
        if self.compensating and kind not in _LOCAL_KINDS:
            final = (JournalStatus.COMPLETED, JournalStatus.FAILED)
            if entry is None or entry.status not in final:
                raise self._stop(Interrupt("cancelled"))
        return position, key, occurrence, entry

    def _entry(
        self, position: int, key: str, occurrence: int, kind: str, **fields: Any
    ) -> JournalEntry:
        existing = self._by_position.get(position)
        if existing is not None:
            return evolve(existing, fields)
        return JournalEntry(
            workflow_run_id=self.run_id,
            position=position,
            name=key,
            occurrence=occurrence,
            kind=kind,
            created_at=self._now(),
            **fields,
        )

    def _remember(self, entry: JournalEntry) -> None:
        if entry.status is _WAITING:
            self._waiting.add((entry.name, entry.occurrence))
        else:
            self._waiting.discard((entry.name, entry.occurrence))
        if entry.position < self._kept_from:
            return
        self._by_position[entry.position] = entry
        self._by_key[(entry.name, entry.occurrence)] = entry

    async def _commit(
        self,
        entries: Sequence[JournalEntry],
        events: Sequence[EventBase] = (),
        *,
        consume: Sequence[tuple[int, str]] = (),
        replies: Sequence[tuple[int, JsonValue]] = (),
        start_children: Sequence[ChildStart] = (),
        ai_calls: Sequence[AICall] = (),
    ) -> None:
        """Commit ``entries`` with the pending ones; a storage failure unwinds the body
        (``crash``) instead of surfacing inside it, so a body cannot carry on past a step
        whose result was not recorded."""
        async with self._commit_lock:
            await self.commit_locked(
                entries,
                events,
                consume=consume,
                replies=replies,
                start_children=start_children,
                ai_calls=ai_calls,
            )

    async def commit_locked(
        self,
        entries: Sequence[JournalEntry],
        events: Sequence[EventBase] = (),
        *,
        consume: Sequence[tuple[int, str]] = (),
        replies: Sequence[tuple[int, JsonValue]] = (),
        start_children: Sequence[ChildStart] = (),
        cancel_children: Sequence[str] = (),
        ai_calls: Sequence[AICall] = (),
    ) -> None:
        """``_commit`` for a caller already holding ``commit_lock`` (a race deciding)."""
        batch = [*self._pending, *entries]
        try:
            stored = await self._writer.commit(
                batch,
                [*self._pending_events, *events],
                consume=consume,
                replies=replies,
                start_children=start_children,
                cancel_children=cancel_children,
                ai_calls=ai_calls,
            )
        except Interrupt as interrupt:
            raise self._stop(interrupt) from None
        except Exception as exc:
            raise self._stop(Interrupt("crash", error=exc)) from exc
        self._pending.clear()
        self._pending_events.clear()
        for entry in stored:
            self._remember(entry)

    def _suspend(self, wait: Wait) -> Interrupt:
        span = self._writer.span
        if span is not None:  # a wait is an event of the activation, not a span held open
            attributes: dict[str, AttributeValue] = {
                "treadle.wait.kind": wait.kind,
                "treadle.wait.name": wait.name,
            }
            if wait.until is not None:
                attributes["treadle.wait.until"] = wait.until.isoformat()
            if wait.signal is not None:
                attributes["treadle.wait.signal"] = wait.signal
            span.event("treadle.wait", attributes)
        return self._stop(Interrupt("suspend", waits=[wait]))

    # -- sticky execution (``kernel.workflows.sticky``) ------------------------------------
    def _may_park(self, interrupt: Interrupt) -> bool:
        """Whether the call that raised ``interrupt`` can park the body: it is this
        context's suspension, of that one call, at the last position reserved."""
        if interrupt is not self.interrupt or interrupt.reason != "suspend":
            return False
        if self.driver is None or asyncio.current_task() is not self.driver:
            return False
        if len(interrupt.waits) != 1:
            return False
        return interrupt.waits[0].position == self._next_position - 1

    async def _park(self) -> None:
        """Give the call's position back (it is made again on resume) and park; returns
        once the next activation resumed the body (``resume``)."""
        assert self.interrupt is not None
        wait = self.interrupt.waits[0]
        self._next_position = wait.position
        self._occurrences[wait.name] = wait.occurrence - 1
        self.parked_at = wait.position
        for position in range(self._kept_from, wait.position):  # what it passed since
            passed = self._by_position.pop(position, None)
            if passed is not None:
                self._by_key.pop((passed.name, passed.occurrence), None)
        self._kept_from = wait.position
        await _Park()
        self.parked_at = None

    def committed(self, stored: Sequence[JournalEntry]) -> None:
        """The executor committed the pending calls (``stored``, as stored) with the end
        of the activation: a parked body must not write them again."""
        self._pending.clear()
        self._pending_events.clear()
        for entry in stored:
            self._remember(entry)

    def resume(
        self,
        writer: JournalWriter,
        cancelled: CancellationToken,
        overrides: typing.Mapping[str, Callable[..., Any]],
        fresh: Sequence[JournalEntry],
    ) -> None:
        """Hand a parked body to a new activation: its writer (which checks *its* lease)
        and cancellation token, the step mocks of now, and ``fresh``, the journal from the
        parked position on (what the waits recorded and what woke it). Entries before
        that position are final, so the context already holds them as stored."""
        self._writer = writer
        self._cancelled = cancelled
        self._overrides = dict(overrides)
        self.interrupt = None
        for entry in fresh:
            self._remember(entry)
            self._last_recorded = max(self._last_recorded, entry.position)

    def close(self) -> None:
        """The parked body is dropped (evicted, or its run moved on elsewhere): from now
        on every ``ctx`` call raises, so code that runs while the body unwinds
        (``finally`` blocks) can neither journal nor run a step."""
        self.interrupt = Interrupt("ghost")
        self._writer = _CLOSED

    # -- steps ----------------------------------------------------------------------------
    @_resumable
    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - binding API name (DESIGN §3.2)
        idempotency_key: str | None = None,
    ) -> Any:
        """Run ``fn(*args)`` (sync or async) once, durably: its result is journaled and a
        replay returns it without calling ``fn``. Failures retry per ``retry``; once they
        are exhausted ``StepFailedError`` is raised here (the body may catch it)."""
        return await self.durable_call(
            "step", name, fn, args, retry=retry, timeout=timeout, idempotency_key=idempotency_key
        )

    async def durable_call(
        self,
        kind: Literal["step", "compensate"],
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        *,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - mirrors step()
        idempotency_key: str | None = None,
    ) -> Any:
        """``step`` for a journal ``kind``: ``compensate`` runs a saga's compensation."""
        check_name(name, kind)
        seconds = _seconds(timeout, "timeout")
        if self._cancelled:  # a lost run starts no new step
            raise self._stop(Interrupt("ghost"))
        position, key, occurrence, entry = self._reserve(kind, name)
        adapter = _result_adapter(fn)
        if entry is not None:
            if entry.status is JournalStatus.COMPLETED:
                return _decode(adapter, entry.result)
            if entry.status is JournalStatus.FAILED:
                raise StepFailedError(key, occurrence, entry.attempts, entry.error)
            until = entry.until
            if until is not None and until > self._now():
                raise self._suspend(Wait("retry", position, key, occurrence, until))
        policy = retry or DEFAULT_STEP_RETRY
        ikey = (
            idempotency_key
            or (entry.idempotency_key if entry is not None else None)
            or f"{self.run_id}:{key}:{occurrence}"
        )
        call = self._overrides.get(key, fn)
        attempts = entry.attempts if entry is not None else 0
        while True:
            attempt = attempts + 1
            if self._pending:
                await self._commit([])  # a step's side effects never precede what it saw
            if self._writer.paused and kind == "step" and CURRENT_BRANCH.get() is None:
                # Paused (handlers/lifecycle.py): the step in flight committed; this one
                # does not start. The activation suspends; run.resume replays to here.
                # (The arguments of one ctx.all / ctx.race start together.)
                raise self._stop(Interrupt("suspend"))
            started = self._now()
            info = StepInfo(key, occurrence, attempt, ikey, self._cancelled)
            calls = AICallBuffer(
                run_id=self.run_id,
                workflow_id=self.workflow_id,
                stage_id=None,
                step=f"{key}#{occurrence}",
                attempt=attempt,
                now=self._now,
                recording=self._ai_services.recording,
            )
            parent = self._writer.span
            span = parent.step(key, attempt, kind=kind) if parent is not None else None
            try:
                if span is None:
                    value = await _attempt(call, args, info, calls, seconds, timeout, name)
                else:
                    with span.active():  # the step's own spans nest under it
                        value = await _attempt(call, args, info, calls, seconds, timeout, name)
                result = _encode(adapter, value, name)
            except Exception as exc:
                retry_at = await self._record_failure(
                    exc,
                    policy,
                    position,
                    key,
                    occurrence,
                    attempt,
                    ikey,
                    kind,
                    ai_calls=calls.drain(failed=True),
                )
                if span is not None:
                    span.end("failed", error=exc, retrying=retry_at is not None)
                if retry_at is None:
                    raise StepFailedError(
                        key, occurrence, attempt, describe_exception(exc)
                    ) from exc
                if retry_at <= self._now():
                    attempts = attempt
                    continue
                raise self._suspend(Wait("retry", position, key, occurrence, retry_at)) from None
            else:
                if span is not None:
                    span.end("completed")
            finally:
                if span is not None:
                    span.end("interrupted")  # no-op after an end above
            now = self._now()
            done = self._entry(
                position,
                key,
                occurrence,
                kind,
                status=JournalStatus.COMPLETED,
                attempts=attempt,
                result=result,
                error=None,
                input=None,
                idempotency_key=ikey,
                completed_at=now,
            )
            event = StepCompleted(
                workflow_run_id=self.run_id,
                timestamp=now,
                step=key,
                occurrence=occurrence,
                attempt=attempt,
                output=result,
                duration=now - started,
            )
            recorded = calls.drain(failed=False)
            if kind == "step" and not recorded and CURRENT_BRANCH.get() is None:
                # Committed with the body's next durable boundary: the next step commits
                # it before it starts (above), and the activation's end commits it with
                # the run's completion (or its waits), in one commit instead of two.
                self._pending.append(done)
                self._pending_events.append(event)
            else:
                await self._commit([done], [event], ai_calls=recorded)
            return _decode(adapter, result)

    async def _record_failure(
        self,
        exc: Exception,
        policy: RetryPolicy,
        position: int,
        key: str,
        occurrence: int,
        attempt: int,
        ikey: str,
        kind: str = "step",
        *,
        ai_calls: Sequence[AICall] = (),
    ) -> datetime | None:
        """Journal a failed attempt; returns when the next attempt is due, or ``None``
        when the step failed for good."""
        now = self._now()
        message = describe_exception(exc)
        again = policy.allows_another(attempt, exc)
        retry_at = now + policy.delay_after(attempt, exc, seed=ikey) if again else None
        entry = self._entry(
            position,
            key,
            occurrence,
            kind,
            status=JournalStatus.RETRYING if again else JournalStatus.FAILED,
            attempts=attempt,
            error=message,
            idempotency_key=ikey,
            input={"until": retry_at.isoformat()} if retry_at is not None else None,
            completed_at=None if again else now,
        )
        event = StepFailed(
            workflow_run_id=self.run_id,
            timestamp=now,
            step=key,
            occurrence=occurrence,
            attempt=attempt,
            error=message,
            will_retry=again,
            retry_at=retry_at,
            traceback=short_traceback(exc),
        )
        await self._commit([entry], [event], ai_calls=ai_calls)
        return retry_at

    # -- sagas ----------------------------------------------------------------------------
    def register_compensation(self, compensation: Compensation) -> None:
        """``saga.add``: journal the registration (replay checks its order) and keep the
        function for ``run_compensations``; functions are never stored."""
        name = check_name(compensation.name, "compensation")
        position, key, occurrence, entry = self._reserve("compensation", name)
        if entry is None:
            self._pending.append(
                self._entry(
                    position,
                    key,
                    occurrence,
                    "compensation",
                    status=JournalStatus.COMPLETED,
                    completed_at=self._now(),
                )
            )
        self.compensations.append(compensation)

    def begin_compensation(self) -> None:
        """Let compensations run after the body stopped: a cancelled replay's or a
        swallowed suspension's interrupt is dropped, and the compensations take the
        positions after the body's last call, the same ones on every replay."""
        if self.interrupt is not None and self.interrupt.reason in ("cancelled", "suspend"):
            self.interrupt = None
        forward = [p for p, e in self._by_position.items() if e.kind != "compensate"]
        self._next_position = max(self._next_position, max(forward, default=-1) + 1)

    # -- composition ----------------------------------------------------------------------
    async def all(self, *calls: Awaitable[Any]) -> list[Any]:
        """Run ``ctx`` calls (``ctx.step(...)``, ``ctx.child(...)``, ``ctx.sleep(...)``, a
        signal wait, ...) concurrently; their results in argument order. Each is journaled
        on its own. When all have settled, the first failure in argument order is raised;
        while any still waits, the run suspends on all their waits together."""
        return await gather_all(self, calls)

    async def race(self, *calls: Awaitable[Any], name: str = "race") -> tuple[int, Any]:
        """Run ``ctx`` calls concurrently; ``(index, value)`` of the first to finish (its
        error is raised if it failed). The others are cancelled and never journaled as
        completed; the winner is journaled, so a replay returns the same one."""
        return await race_first(self, calls, check_name(name, "race"))

    @_resumable
    async def child(
        self, workflow_id: str, input: Any = None, *, config: Mapping[str, Any] | None = None
    ) -> Any:
        """Start a child run of ``workflow_id`` (a code workflow or a pipeline; its own
        record with ``parent_run_id`` set) and return its validated output; the run waits
        without holding a worker until the child ends. ``ChildWorkflowFailedError`` if the
        child failed or was cancelled. Cancelling this run cancels its children."""
        return await await_child(self, workflow_id, input, config)

    # -- time -----------------------------------------------------------------------------
    @_resumable
    async def sleep(self, duration: timedelta | float, *, name: str = "sleep") -> None:
        """Suspend the run for ``duration`` (a number means seconds) without holding a
        worker; a timer fired by the maintenance tick resumes it."""
        seconds = to_duration(duration, "sleep duration", least="any").total_seconds()
        position, key, occurrence, entry = self._reserve("sleep", check_name(name, "sleep"))
        until = entry.until if entry is not None else self._now() + timedelta(seconds=seconds)
        await self._sleep_to(position, key, occurrence, entry, until)

    @_resumable
    async def sleep_until(self, when: datetime, *, name: str = "sleep") -> None:
        """Suspend the run until ``when`` (timezone-aware); returns at once if it passed."""
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError("sleep_until needs a timezone-aware datetime")
        position, key, occurrence, entry = self._reserve("sleep", check_name(name, "sleep"))
        until = entry.until if entry is not None else when
        await self._sleep_to(position, key, occurrence, entry, until)

    async def _sleep_to(
        self,
        position: int,
        key: str,
        occurrence: int,
        entry: JournalEntry | None,
        until: datetime | None,
    ) -> None:
        if entry is not None and entry.status is JournalStatus.COMPLETED:
            return
        now = self._now()
        if until is None or until <= now:
            if entry is not None:  # due, but woken by something else before its timer
                self._pending.append(
                    self._entry(
                        position,
                        key,
                        occurrence,
                        "sleep",
                        status=JournalStatus.COMPLETED,
                        completed_at=now,
                    )
                )
            return
        raise self._suspend(Wait("sleep", position, key, occurrence, until))

    def now(self) -> datetime:
        """The current time, journaled: a replay sees the value the first run saw."""
        position, key, occurrence, entry = self._reserve("now", "")
        if entry is not None:
            return datetime.fromisoformat(str(entry.result))
        value = self._now()
        self._pending.append(
            self._entry(
                position,
                key,
                occurrence,
                "now",
                status=JournalStatus.COMPLETED,
                result=value.isoformat(),
                completed_at=value,
            )
        )
        return value

    def uuid(self) -> str:
        """A new unique id (uuid7 by default, from the kernel's id port), journaled."""
        position, key, occurrence, entry = self._reserve("uuid", "")
        if entry is not None:
            return str(entry.result)
        value = self._new_id()
        self._pending.append(
            self._entry(
                position,
                key,
                occurrence,
                "uuid",
                status=JournalStatus.COMPLETED,
                result=value,
                completed_at=self._now(),
            )
        )
        return value

    # -- messages -------------------------------------------------------------------------
    def publish(self, key: str, value: Any) -> None:
        """Make ``value`` readable by ``engine.query(run_id, key)``. Journaled, and
        committed with the body's next durable boundary (before any later step runs)."""
        position, jkey, occurrence, entry = self._reserve("publish", check_name(key, "publish"))
        if entry is not None:
            return
        encoded = to_json(value, "value", what=f"publish {key!r}")
        self._pending.append(
            self._entry(
                position,
                jkey,
                occurrence,
                "publish",
                status=JournalStatus.COMPLETED,
                result=encoded,
                completed_at=self._now(),
            )
        )

    def set_attribute(self, key: str, value: Any) -> None:
        """Set the run's search attribute ``key`` (``engine.list(attributes={key: value})``
        finds the run). Journaled like ``publish``: committed, with an ``attribute:set``
        event, in the same transaction as the body's next durable boundary; a replay does
        not write it again. ``value`` is a JSON scalar; ``None`` stores a null (the key stays)."""
        _check_attribute(key, value)
        position, jkey, occurrence, entry = self._reserve("attribute", key)
        if entry is not None:
            return
        now = self._now()
        self._pending.append(
            self._entry(
                position,
                jkey,
                occurrence,
                "attribute",
                status=JournalStatus.COMPLETED,
                result=value,
                completed_at=now,
            )
        )
        self._pending_events.append(
            AttributeSet(workflow_run_id=self.run_id, timestamp=now, key=key, value=value)
        )

    def continue_as_new(self, input: Any) -> NoReturn:
        """End this run and continue the same logical workflow as a new run with ``input``
        and an empty journal (``kernel.workflows.continuation``). Never returns: it
        unwinds the body, like a return that hands over. The new run pins the version
        registered for new runs now, keeps the search attributes, priority, config and
        idempotency key, and receives the signals this run had not consumed.

        ``input`` is validated against that version's input model first: a bad one
        raises ``InvalidInputError`` naming the field, here, and nothing is written.
        Call it from the body itself: inside a step, or as an argument of ``ctx.all`` /
        ``ctx.race``, it fails the run with a ``WorkflowError`` naming the step."""
        step = _CURRENT_STEP.get()
        if step is not None or CURRENT_BRANCH.get() is not None:
            where = f"inside step {step.name!r}" if step is not None else "in ctx.all / ctx.race"
            misuse = WorkflowError(
                f"workflow {self.workflow_id!r} run {self.run_id!r}: ctx.continue_as_new was "
                f"called {where}; call it from the workflow body (the run can only end there)"
            )
            raise self._stop(Interrupt("fatal", error=misuse))
        if self.interrupt is not None:
            raise self.interrupt
        if self.compensating:  # a cancelled run replays to its compensations, never onwards
            raise self._stop(Interrupt("cancelled"))
        wf = self._writer.child_workflow(self.workflow_id)
        encoded = wf.validate_input(input)
        raise self._stop(Interrupt("continue", input=encoded, version=wf.version))

    @_resumable
    async def wait_for_signal(
        self,
        name: str,
        model: Any = None,
        *,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - binding API name (DESIGN §3.2)
    ) -> Any:
        """The oldest signal ``name`` not yet consumed, validated by ``model``; suspends
        the run until one arrives. ``WaitTimeoutError`` once ``timeout`` passes first."""
        adapter = TypeAdapter(model) if model is not None else None
        entry = await self._wait_message("signal", name, timeout)
        return _message_value(entry, adapter, "signal", name)

    @_resumable
    async def wait_for_update(
        self,
        name: str,
        model: Any = None,
        *,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - binding API name (DESIGN §3.2)
    ) -> UpdateRequest:
        """The oldest update ``name`` not yet taken: its validated ``payload``; the body
        answers with ``await request.reply(value)``, which ``engine.update`` returns."""
        adapter = TypeAdapter(model) if model is not None else None
        entry = await self._wait_message("update", name, timeout)
        payload = _message_value(entry, adapter, "update", name)
        result = entry.result if isinstance(entry.result, dict) else {}
        return UpdateRequest(
            self, name, str(result.get("update_id")), int(result["message_id"]), payload
        )

    async def _wait_message(
        self, kind: Literal["signal", "update"], name: str, limit: timedelta | float | None
    ) -> JournalEntry:
        """The journal entry of this wait, completed with a consumed message or a timeout;
        unwinds the body (suspend) while neither has happened."""
        check_name(name, kind)
        seconds = _seconds(limit, "timeout")
        position, key, occurrence, entry = self._reserve(kind, name)
        if entry is not None and entry.status is JournalStatus.COMPLETED:
            return entry
        now = self._now()
        if entry is not None:
            until = entry.until
        else:
            until = now + timedelta(seconds=seconds) if seconds is not None else None
        wait_input = entry.input if entry is not None else None
        try:
            message = await self._writer.peek_message(kind, name)
        except PayloadMissingError as exc:  # its offloaded payload is gone: the run fails
            raise self._stop(Interrupt("fatal", error=exc)) from exc
        except Exception as exc:
            raise self._stop(Interrupt("crash", error=exc)) from exc
        if message is not None:
            assert message.id is not None
            done = self._entry(
                position,
                key,
                occurrence,
                kind,
                status=JournalStatus.COMPLETED,
                input=wait_input,
                result=message_result(message),
                completed_at=now,
            )
            await self._commit([done], consume=[(message.id, f"{key}#{occurrence}")])
            return self._by_position[position]
        if until is not None and until <= now:
            done = self._entry(
                position,
                key,
                occurrence,
                kind,
                status=JournalStatus.COMPLETED,
                input=wait_input,
                result={"timed_out": True},
                completed_at=now,
            )
            await self._commit([done])
            return self._by_position[position]
        raise self._suspend(Wait(kind, position, key, occurrence, until, signal=name))

    @_resumable
    async def review(
        self,
        artifact: Any = None,
        *,
        review_type: str = "review",
        reviewers: Sequence[str] = (),
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - binding API name (DESIGN §3.2)
    ) -> ReviewDecision:
        """Ask people for a decision on ``artifact``: records ``review:requested`` (with a
        ``review_id``), suspends the run, and resumes with the decision given through
        ``engine.decide_review``, or a ``timed_out`` one once ``timeout`` passes."""
        seconds = _seconds(timeout, "timeout")
        position, key, occurrence, entry = self._reserve(
            "review", check_name(review_type, "review")
        )
        if entry is not None and entry.status is JournalStatus.COMPLETED:
            return _decision(entry)
        now = self._now()
        if entry is not None:
            details = dict(entry.input or {})
            until = entry.until
        else:
            details = {
                "review_id": self._new_id(),
                "review_type": review_type,
                "reviewers": to_json(list(reviewers), "reviewers", what="review"),
                "artifact": to_json(artifact, "artifact", what="review"),
            }
            until = now + timedelta(seconds=seconds) if seconds is not None else None
        if until is not None and until <= now:
            done = self._entry(
                position,
                key,
                occurrence,
                "review",
                status=JournalStatus.COMPLETED,
                input=entry.input if entry is not None else None,
                result={"decision": "timed_out", "review_id": details.get("review_id")},
                completed_at=now,
            )
            await self._commit([done])
            return _decision(self._by_position[position])
        details.pop("until", None)
        raise self._suspend(Wait("review", position, key, occurrence, until, details=details))

    async def _reply(self, request: UpdateRequest, value: Any) -> None:
        position, key, occurrence, entry = self._reserve("reply", request.name)
        if entry is not None:
            return
        encoded = to_json(value, "reply", what=f"reply to update {request.name!r}")
        done = self._entry(
            position,
            key,
            occurrence,
            "reply",
            status=JournalStatus.COMPLETED,
            result={"update_id": request.update_id, "value": encoded},
            completed_at=self._now(),
        )
        replied = UpdateReplied(
            workflow_run_id=self.run_id,
            timestamp=self._now(),
            name=request.name,
            update_id=request.update_id,
            reply=encoded,
        )
        await self._commit([done], [replied], replies=[(request.message_id, {"value": encoded})])


class ReviewDecision(BaseModel):
    """How a review ended: ``approved``, ``rejected`` or ``timed_out``."""

    model_config = ConfigDict(frozen=True)

    review_id: str
    decision: Literal["approved", "rejected", "timed_out"]
    reviewer: str | None = None
    comment: str | None = None

    @property
    def approved(self) -> bool:
        return self.decision == "approved"


def _decision(entry: JournalEntry) -> ReviewDecision:
    result = dict(entry.result) if isinstance(entry.result, dict) else {}
    result.setdefault("review_id", (entry.input or {}).get("review_id"))
    if result.get("timed_out"):
        result = {"review_id": result["review_id"], "decision": "timed_out"}
    return ReviewDecision.model_validate(result)


class UpdateRequest:
    """An update taken by ``wait_for_update``: ``payload``, ``update_id``, and ``reply``."""

    def __init__(
        self, ctx: WorkflowContext, name: str, update_id: str, message_id: int, payload: Any
    ) -> None:
        self._ctx = ctx
        self.name = name
        self.update_id = update_id
        self.message_id = message_id
        self.payload = payload

    async def reply(self, value: Any = None) -> None:
        """Answer the caller of ``engine.update``; journaled, so a replay does not answer
        twice."""
        await self._ctx._reply(self, value)


def message_result(message: InboxMessage) -> JsonValue:
    """What a wait journals about the message it consumed."""
    result: dict[str, JsonValue] = {"payload": message.payload, "message_id": message.id}
    if message.update_id is not None:
        result["update_id"] = message.update_id
    return result


def _message_value(
    entry: JournalEntry, adapter: TypeAdapter[Any] | None, kind: str, name: str
) -> Any:
    result = entry.result if isinstance(entry.result, dict) else {}
    if result.get("timed_out"):
        raise WaitTimeoutError(f"{kind} {name!r} did not arrive before its timeout")
    payload = result.get("payload")
    if adapter is None:
        return payload
    try:
        return adapter.validate_python(payload)
    except PydanticValidationError as exc:
        error: TreadleValidationError = InvalidPayloadError.from_pydantic(
            f"{kind} {name!r} payload does not match its model", exc, prefix="payload"
        )
        raise error from None
