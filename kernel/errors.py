"""Every error Treadle raises, under one root.

Callers catch by family, not by message. Each class carries a stable ``code``
(its class name) and says on the type whether retrying can help.

::

    TreadleError
    ├── TreadleValidationError            bad input; nothing was written
    │   ├── InvalidCommandError           a command mapping or field is wrong
    │   ├── InvalidInputError             run input does not match the workflow's model
    │   ├── InvalidConfigError            stage config does not match its model
    │   ├── InvalidPayloadError           signal / update / decision payload is wrong
    │   └── OutputValidationError         a stage returned the wrong shape (never retried)
    ├── DefinitionError                   a workflow or stage definition is inconsistent
    ├── UnknownCommandError               no handler for a command type
    ├── NotSupportedError                 the command does not apply to this kind of workflow
    ├── NotFoundError
    │   ├── WorkflowNotFoundError
    │   ├── RunNotFoundError
    │   ├── StageNotFoundError
    │   ├── StepNotFoundError             a code-workflow run's journal has no such step
    │   ├── JobNotFoundError
    │   └── ScheduleNotFoundError         no cron schedule with this id
    ├── ConflictError
    │   ├── DuplicateError                a unique key already exists (both SQL dialects)
    │   ├── ConcurrencyError              an optimistic ``version`` check lost a race (retryable)
    │   ├── InvalidStateError             the run or stage is not in a state that allows this
    │   └── IdempotencyInProgressError    the same key is executing right now (retryable)
    ├── StageError                        raised *inside* stage bodies
    │   ├── NonRetryableError             user code: fail this stage without retrying
    │   ├── StageTimeoutError             a stage body ran past its timeout
    │   ├── BodyInterruptedError          a stage or step body raised a BaseException that is
    │   │                                 no Exception (KeyboardInterrupt, SystemExit, its own
    │   │                                 CancelledError): a failed attempt (retryable)
    │   ├── SuspendTimeoutError           a suspended stage waited past ``max_wait``
    │   └── RemoteStageError              a remote worker reported its execution failed
    │                                     (``job.fail``; retryable unless it says not)
    ├── AIError                           AI calls and costs (``ctx.ai``, the ``ai`` extra)
    │   ├── BudgetExceededError           a run's AI cost reached its ``max_cost``: no further call
    │   │                                 is made, the run fails (never retried)
    │   ├── AIRateLimitedError            the provider said 429 / overloaded (retryable; the
    │   │                                 retry waits at least its ``retry_after``)
    │   ├── AIRecordError                 ``ctx.ai.record`` called where no attempt can own the call
    │   ├── AIExtraMissingError           ``ctx.ai.generate_*`` without the ``ai`` extra installed
    │   └── AgentOutsideWorkflowError     a ``TreadleAgent`` step or ``current_workflow()`` outside
    │                                     ``TreadleAgent.run(ctx, ...)``
    ├── RunFailedError                    awaited a run's result; the run FAILED
    ├── RunCancelledError                 awaited a run's result; the run was CANCELLED
    ├── WorkflowError                     code workflows: replay problems, and errors raised
    │   │                                 inside a workflow body that it may catch
    │   ├── NonDeterminismError           the body reached another call than the journal recorded
    │   ├── VersionMismatchError          a run's pinned version is not registered (run blocked)
    │   ├── StepFailedError               a step failed for good (retries exhausted)
    │   ├── StepTimeoutError              one attempt of a step ran past its timeout (retryable)
    │   ├── WaitTimeoutError              a signal wait reached its timeout
    │   └── ChildWorkflowFailedError      a child run (``ctx.child``) failed or was cancelled
    └── StorageError                      a driver failure, translated at the adapter boundary
        ├── TransientStorageError         connection lost, serialization failure (retryable)
        └── PayloadMissingError           an offloaded value's blob is gone (fails its run only)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import traceback
from collections.abc import Sequence
from typing import Any, ClassVar

from treadle.kernel.text import safe_text


class TreadleError(Exception):
    """Root of every Treadle error; ``code`` is stable across releases."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        return type(self).__name__


class TreadleValidationError(TreadleError):
    """Input was rejected; ``errors`` lists ``(field path, problem)`` pairs."""

    def __init__(self, message: str, errors: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.errors: list[tuple[str, str]] = list(errors)

    @classmethod
    def from_pydantic(cls, what: str, exc: Any, prefix: str = "") -> TreadleValidationError:
        """Build from a ``pydantic.ValidationError`` so the message names each field."""
        errors: list[tuple[str, str]] = []
        for err in exc.errors():
            loc = ".".join(str(part) for part in err.get("loc", ()))
            path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "<root>")
            errors.append((path, str(err.get("msg", "invalid"))))
        detail = "; ".join(f"{path}: {msg}" for path, msg in errors)
        return cls(f"{what}: {detail}", errors)


class InvalidCommandError(TreadleValidationError):
    """A command mapping has an unknown shape or a bad field."""


class InvalidInputError(TreadleValidationError):
    """Run input does not match the workflow's input model."""


class InvalidConfigError(TreadleValidationError):
    """A stage's config does not match its config model, or names an unknown stage."""


class InvalidPayloadError(TreadleValidationError):
    """A signal, update or review payload is malformed."""


class OutputValidationError(TreadleValidationError):
    """A stage returned a value that does not match its output model."""


class DefinitionError(TreadleError):
    """A workflow or stage definition is inconsistent (raised at build time)."""


class UnknownCommandError(TreadleError):
    """The kernel has no handler for this command type."""


class NotSupportedError(TreadleError):
    """The command exists but does not apply to this workflow's kind."""


class NotFoundError(TreadleError):
    """Something named by id does not exist."""


class WorkflowNotFoundError(NotFoundError):
    """The registry has no workflow with this id (deploy lag, typo)."""

    retryable = True


class RunNotFoundError(NotFoundError):
    """No run with this id."""


class StageNotFoundError(NotFoundError):
    """The workflow has no stage with this id."""


class StepNotFoundError(NotFoundError):
    """A code-workflow run's journal has no step of this name (and occurrence)."""


class JobNotFoundError(NotFoundError):
    """No job with this id in the transport."""


class ScheduleNotFoundError(NotFoundError):
    """No cron schedule with this id."""


class ConflictError(TreadleError):
    """The request conflicts with the current stored state."""


class DuplicateError(ConflictError):
    """A row with the same unique key already exists."""


class ConcurrencyError(ConflictError):
    """An optimistic version check failed: someone else updated the row first."""

    retryable = True


class InvalidStateError(ConflictError):
    """The run or stage is not in a state that allows the operation."""


class IdempotencyInProgressError(ConflictError):
    """A command with the same idempotency key is still executing."""

    retryable = True


class StageError(TreadleError):
    """Errors meant to be raised from, or about, stage bodies."""


class NonRetryableError(StageError):
    """Raise from a stage body to fail the stage at once, ignoring the retry policy."""


class StageTimeoutError(StageError):
    """The stage body ran longer than its ``timeout``."""

    retryable = True


class BodyInterruptedError(StageError):
    """A stage or step body raised a ``BaseException`` that is not an ``Exception``:
    ``KeyboardInterrupt``, ``SystemExit``, or a ``CancelledError`` it raised itself
    (not the worker cancelling it). Recorded as that attempt's failure, under the
    retry policy, so it can neither kill the worker nor loop forever."""

    retryable = True


class AIError(TreadleError):
    """AI calls and their costs (``ctx.ai``, ``kernel/ai.py``)."""


class BudgetExceededError(AIError):
    """The run's AI calls cost ``spent``, which reached its ``max_cost``: the call about to
    be made is not made and the run fails. Never retried (retrying would only spend more)."""

    def __init__(self, message: str, *, spent: Any = None, max_cost: Any = None) -> None:
        super().__init__(message)
        self.spent = spent
        self.max_cost = max_cost


class AIRateLimitedError(AIError):
    """The provider refused the call for now (HTTP 429, overloaded). Retryable; the next
    attempt waits at least ``retry_after`` seconds (the provider's ``Retry-After``),
    durably: a stage retries after its backoff, a step suspends on a timer."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AIRecordError(AIError):
    """``ctx.ai.record`` was called where no stage or step attempt can own the call (the
    body of a code workflow, outside any step)."""


class AIExtraMissingError(AIError):
    """``ctx.ai.generate_*`` needs the ``ai`` extra: ``pip install 'treadle[ai]'``."""


class AgentOutsideWorkflowError(AIError):
    """A durable operation of a ``TreadleAgent`` (``treadle.ai.agents``), or
    ``current_workflow()``, was reached outside ``TreadleAgent.run(ctx, ...)``."""


class SimulatedCrash(BaseException):
    """Not an error: raise it from a stage or step (``treadle.testing`` exports it) to
    stop the execution as a SIGKILL of the worker would, leaving its lease held and
    nothing recorded. Every other ``BaseException`` from a body is a failed attempt
    (``BodyInterruptedError``); this one is let through so tests can exercise crash
    recovery in process."""


def as_body_failure(exc: BaseException, where: str) -> BodyInterruptedError | None:
    """What a ``BaseException`` out of a user body means: ``None`` when it must go on
    up (our own task is being cancelled: the host stopping, a timeout firing), else the
    failure to record. Told apart by who cancelled, not by the exception's type: a
    ``CancelledError`` the body raised itself, or one from a task it awaited, arrives
    while the running task has no cancellation pending. ``SimulatedCrash`` goes on up."""
    if isinstance(exc, SimulatedCrash):
        return None
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return None
    text = str(exc)
    failure = BodyInterruptedError(
        f"{where} raised {type(exc).__name__}" + (f": {text}" if text else "")
    )
    failure.__cause__ = exc  # its traceback (``short_traceback``) shows where it came from
    return failure


class RemoteStageError(StageError):
    """A remote worker reported that its execution of a stage failed (``job.fail``). The
    message is the worker's; ``retryable`` follows what it said (``docs/remote-workers.md``)."""

    retryable = True


class SuspendTimeoutError(StageError):
    """A suspended stage was not ready within its ``max_wait``."""


class RunFailedError(TreadleError):
    """``handle.result()`` on a run that FAILED; ``run_id`` and ``error`` say which and why."""

    def __init__(self, run_id: str, error: str | None) -> None:
        super().__init__(f"run {run_id!r} failed: {error}")
        self.run_id = run_id
        self.error = error


class RunCancelledError(TreadleError):
    """``handle.result()`` on a run that was CANCELLED."""

    def __init__(self, run_id: str, reason: str | None) -> None:
        super().__init__(f"run {run_id!r} was cancelled" + (f": {reason}" if reason else ""))
        self.run_id = run_id
        self.reason = reason


class WorkflowError(TreadleError):
    """Code-workflow replay problems."""


class NonDeterminismError(WorkflowError):
    """The workflow body reached a different step than its journal recorded."""


class VersionMismatchError(WorkflowError):
    """A run pinned to one version met a worker that does not register it. Recorded as the
    blocked run's ``error`` (the run stays SUSPENDED, its journal intact) rather than
    raised; the run resumes once a worker with the pinned version polls it."""


class StepFailedError(WorkflowError):
    """Raised inside a workflow body when a step has failed for good; the body may catch
    it. ``step``, ``attempts`` and ``error`` (the last attempt's ``Type: message``) say
    which and why. Replay raises it again from the journal, never re-running the step."""

    def __init__(self, step: str, occurrence: int, attempts: int, error: str | None) -> None:
        super().__init__(f"step {step!r} #{occurrence} failed after {attempts} attempt(s): {error}")
        self.step = step
        self.occurrence = occurrence
        self.attempts = attempts
        self.error = error


class StepTimeoutError(WorkflowError):
    """One attempt of a step ran longer than its ``timeout``; the retry policy decides."""

    retryable = True


class WaitTimeoutError(WorkflowError):
    """Raised inside a workflow body when ``wait_for_signal`` reached its timeout."""


class ChildWorkflowFailedError(WorkflowError):
    """Raised inside a workflow body when the child run it awaits with ``ctx.child`` ended
    FAILED or CANCELLED; the body may catch it. ``child_run_id``, ``workflow_id``,
    ``status`` and ``error`` (the child's error or cancel reason) say which and why. Replay
    raises it again from the journal."""

    def __init__(self, child_run_id: str, workflow_id: str, status: str, error: str | None) -> None:
        verb = "was cancelled" if status == "CANCELLED" else "failed"
        detail = f": {error}" if error else ""
        super().__init__(f"child workflow {workflow_id!r} run {child_run_id!r} {verb}{detail}")
        self.child_run_id = child_run_id
        self.workflow_id = workflow_id
        self.status = status
        self.error = error


class StorageError(TreadleError):
    """A storage driver failed; the operation in flight did not commit."""


class TransientStorageError(StorageError):
    """Connection loss, serialization failure or injected chaos; retrying may succeed."""

    retryable = True


class PayloadMissingError(StorageError):
    """A stored value was offloaded to the blob store and its blob is gone (deleted by
    hand, lost with a bucket). Never retried: the value will not come back. It fails the
    run or stage that needs the value, never a claim, a listing or another run; ``run_id``
    (``None`` for a value of no run) and ``key`` say which value."""

    def __init__(self, run_id: str | None, key: str) -> None:
        of_run = f" of run {run_id!r}" if run_id is not None else ""
        super().__init__(f"offloaded payload {key!r}{of_run} is missing from the blob store")
        self.run_id = run_id
        self.key = key


def describe_exception(exc: BaseException) -> str:
    """One line for an error column: ``Type: message``, with any NUL character or lone
    surrogate escaped, so an error message never stops a failure from being stored."""
    text = safe_text(str(exc))
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


MAX_TRACEBACK_CHARS = 8_000
"""The most characters of a stored traceback (``short_traceback``): a stage row and its
``stage:failed`` event stay small even for a deep recursion or a long chain."""

MAX_TRACEBACK_FRAMES = 30
"""The most frames kept per exception of a chain: the innermost, where it was raised."""

_TREADLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENGINE_PREFIXES = (
    *(
        os.path.join(_TREADLE_ROOT, part) + os.sep
        for part in ("kernel", "runtime", "adapters", "hosts", "testing")
    ),
    os.path.join(_TREADLE_ROOT, "engine.py"),
    os.path.dirname(os.path.abspath(asyncio.__file__)) + os.sep,
    os.path.dirname(os.path.abspath(concurrent.futures.__file__)) + os.sep,
    os.path.abspath(threading.__file__),
)
"""Where the engine's own frames live: Treadle's layers, the event loop, the thread pool
that runs sync stages. They sit around every user body and say nothing about the bug."""


def _is_engine_frame(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_ENGINE_PREFIXES)


def _shorten(te: traceback.TracebackException, seen: set[int]) -> None:
    """Drop the engine's frames from ``te`` and every exception chained to it, keeping at
    most ``MAX_TRACEBACK_FRAMES`` (the innermost) of each."""
    if id(te) in seen:
        return
    seen.add(id(te))
    frames = [frame for frame in te.stack if not _is_engine_frame(frame.filename)]
    te.stack = traceback.StackSummary.from_list(frames[-MAX_TRACEBACK_FRAMES:])
    for chained in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):
        if chained is not None:
            _shorten(chained, seen)


def short_traceback(exc: BaseException) -> str | None:
    """``exc``'s traceback as Python prints it, shortened to the user's frames: the
    frames of Treadle itself, asyncio and the stage thread pool are left out (chained
    causes included), so what remains is the path through the stage or step body.
    ``None`` when no user frame is left (an error Treadle raised on its own account,
    such as a timeout or an output that does not match its model: its message says it
    all). Bounded by ``MAX_TRACEBACK_CHARS``, keeping the end, where the error is.

    Pure in the kernel's sense: it reads the exception object (and, as ``traceback``
    always does, the source lines of its frames), never the clock or storage."""
    try:
        te = traceback.TracebackException.from_exception(exc, lookup_lines=False)
        _shorten(te, set())
        if not _has_frames(te, set()):
            return None
        text = safe_text("".join(te.format()))
    except Exception:  # a traceback is a courtesy: never let it stop a failure's record
        return None
    if len(text) > MAX_TRACEBACK_CHARS:
        cut = len(text) - MAX_TRACEBACK_CHARS
        text = f"... ({cut} characters cut)\n" + text[cut:]
    return text


def _has_frames(te: traceback.TracebackException, seen: set[int]) -> bool:
    if id(te) in seen:
        return False
    seen.add(id(te))
    if te.stack:
        return True
    chained = (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ()))
    return any(c is not None and _has_frames(c, seen) for c in chained)
