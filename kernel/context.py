"""``StageContext``: what a stage body sees while it runs.

The context never touches storage directly. Logs and annotations are buffered
and committed with the stage's outcome; progress and heartbeats are handed to a
runtime hook that the kernel flushes in small transactions of their own, so a
stage body (sync in a thread or async) never blocks on the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from treadle.kernel.ai import DEFAULT_AI, AICallBuffer, AIServices, AITotals
from treadle.kernel.ai_helper import StageAI
from treadle.kernel.errors import TreadleError
from treadle.kernel.limits import to_json, validate_attributes
from treadle.kernel.model import JsonValue, MissingPayload
from treadle.kernel.text import safe_text

if TYPE_CHECKING:
    from pydantic import TypeAdapter

InT = TypeVar("InT")
ConfigT = TypeVar("ConfigT")


class _StageOutput(Protocol):
    @property
    def output_adapter(self) -> TypeAdapter[Any]: ...


class StageLookup(Protocol):
    """What a ``StageContext`` needs of its workflow definition: an earlier stage's
    output model, to parse its output. (A protocol, so this module stays below
    ``definitions``, which names ``StageContext`` in its body types.)"""

    def stage(self, stage_id: str, /) -> _StageOutput | None: ...


class MissingOutputError(TreadleError):
    """``ctx.require`` named a stage whose output is not available."""


class StageRuntime(Protocol):
    """Hooks the kernel gives a running stage (progress, heartbeats, blobs)."""

    def report_progress(self, fraction: float, message: str | None) -> None: ...

    def heartbeat(self) -> None: ...

    async def put_blob(self, key: str, data: bytes) -> None: ...

    async def get_blob(self, key: str) -> bytes: ...

    async def has_blob(self, key: str) -> bool: ...

    async def list_blobs(self, prefix: str) -> list[str]: ...

    async def ai_totals(self, run_id: str) -> AITotals | None:
        """The run's committed AI totals and budget (``None``: nothing spent, no budget)."""
        ...


class CancellationToken:
    """Cooperative cancellation: stage bodies poll ``ctx.cancelled`` or await ``wait()``."""

    def __init__(self) -> None:
        # The event is made only when a body awaits ``wait()``: most stages never do,
        # and every stage gets a token.
        self._event: asyncio.Event | None = None
        self._set = False
        self.reason: str | None = None

    def cancel(self, reason: str | None = None) -> None:
        """Set the token; the first reason given is kept (a cancel, then the heartbeat
        noticing the lost job, still says why it was cancelled)."""
        if not self._set:
            self.reason = reason
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set

    def __bool__(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
            if self._set:
                self._event.set()
        await self._event.wait()


class InFlight:
    """The cancellation tokens of the executions running in this process, by job id.

    ``run.cancel`` and the execution-timeout timer set the tokens of a run's executions
    here at once; an execution in another process learns it from its heartbeat, which
    finds its job no longer leased (``runtime.jobs``) and calls ``cancel_job``. Owned by
    one kernel's ``Deps``: not a global."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str | None, CancellationToken]] = {}

    def track(
        self, job_id: str, run_id: str, token: CancellationToken, *, by_run: bool = True
    ) -> _Tracking:
        """Register ``token`` while the execution of ``job_id`` runs (``with
        inflight.track(...)``). ``by_run=False``: a cancel of the run does not apply (the
        execution that runs a cancelled run's compensations); losing its job still does."""
        return _Tracking(self._tokens, job_id, run_id if by_run else None, token)

    def add(self, job_id: str, run_id: str | None, token: CancellationToken) -> None:
        """``track`` without the context manager, for the stage path (every stage): the
        caller ``remove``s it in a ``finally``. ``run_id=None``: as ``by_run=False``."""
        self._tokens[job_id] = (run_id, token)

    def remove(self, job_id: str, token: CancellationToken) -> None:
        """Forget ``token`` for ``job_id`` (unless another execution registered since)."""
        found = self._tokens.get(job_id)
        if found is not None and found[1] is token:
            del self._tokens[job_id]

    def cancel_run(self, run_id: str, reason: str | None = None) -> int:
        """Set the token of every execution of ``run_id`` here; returns how many."""
        hits = [token for owner, token in self._tokens.values() if owner == run_id]
        for token in hits:
            token.cancel(reason)
        return len(hits)

    def cancel_job(self, job_id: str, reason: str | None = None) -> bool:
        found = self._tokens.get(job_id)
        if found is None:
            return False
        found[1].cancel(reason)
        return True


class _Tracking:
    """``InFlight.track``'s context manager: a plain class rather than a
    ``@contextmanager`` generator, as every stage execution enters one."""

    __slots__ = ("_job_id", "_owner", "_token", "_tokens")

    def __init__(
        self,
        tokens: dict[str, tuple[str | None, CancellationToken]],
        job_id: str,
        owner: str | None,
        token: CancellationToken,
    ) -> None:
        self._tokens = tokens
        self._job_id = job_id
        self._owner = owner
        self._token = token

    def __enter__(self) -> None:
        self._tokens[self._job_id] = (self._owner, self._token)

    def __exit__(self, *exc_info: object) -> None:
        found = self._tokens.get(self._job_id)
        if found is not None and found[1] is self._token:
            del self._tokens[self._job_id]


def artifact_prefix(run_id: str, stage_id: str) -> str:
    return f"runs/{run_id}/stages/{stage_id}/artifacts/"


class Artifacts:
    """Named blobs of one stage in one run (``ctx.artifacts.put("page.png", data)``).

    Keys are scoped to the run and stage so ``run.rerunFrom`` can delete exactly
    the artifacts of the stages it resets. Text is stored UTF-8 encoded.
    """

    def __init__(self, runtime: StageRuntime, run_id: str, stage_id: str) -> None:
        self._runtime = runtime
        self._prefix = artifact_prefix(run_id, stage_id)
        self._run_prefix = f"runs/{run_id}/stages/"

    def _key(self, name: str, stage_id: str | None = None) -> str:
        if not name or ("/" in name and name.startswith("/")):
            raise ValueError(f"artifact name {name!r} is not valid")
        if stage_id is not None:
            return f"{self._run_prefix}{stage_id}/artifacts/{name}"
        return self._prefix + name

    async def put(self, name: str, data: bytes | str) -> str:
        key = self._key(name)
        await self._runtime.put_blob(key, data.encode() if isinstance(data, str) else data)
        return key

    async def get(self, name: str, *, stage_id: str | None = None) -> bytes:
        """Read this stage's artifact, or another stage's of the same run."""
        return await self._runtime.get_blob(self._key(name, stage_id))

    async def has(self, name: str, *, stage_id: str | None = None) -> bool:
        return await self._runtime.has_blob(self._key(name, stage_id))

    async def list(self) -> list[str]:
        return [k[len(self._prefix) :] for k in await self._runtime.list_blobs(self._prefix)]


class BufferedLog:
    __slots__ = ("fields", "level", "message", "timestamp")

    def __init__(
        self, level: str, message: str, fields: dict[str, Any], timestamp: datetime
    ) -> None:
        self.level = level
        self.message = message
        self.fields = fields
        self.timestamp = timestamp


class StageContext(Generic[InT, ConfigT]):
    """Everything a stage body may use. Typed by its input and config models."""

    def __init__(
        self,
        *,
        input: InT,
        config: ConfigT,
        run_id: str,
        workflow_id: str,
        stage_id: str,
        attempt: int,
        idempotency_key: str,
        outputs: Mapping[str, JsonValue],
        workflow: StageLookup,
        runtime: StageRuntime,
        now: Callable[[], datetime],
        resume_state: JsonValue = None,
        cancelled: CancellationToken | None = None,
        ai: AIServices = DEFAULT_AI,
    ) -> None:
        self.input = input
        self.config = config
        self.run_id = run_id
        self.workflow_id = workflow_id
        self.stage_id = stage_id
        self.attempt = attempt
        self.idempotency_key = idempotency_key
        self.resume_state = resume_state
        # not ``cancelled or ...``: an unset token is falsy
        self.cancelled = cancelled if cancelled is not None else CancellationToken()
        self._artifacts: Artifacts | None = None
        self._outputs = outputs
        self._workflow = workflow
        self._runtime = runtime
        self._now = now
        self.logs: list[BufferedLog] = []
        self.annotations: list[tuple[dict[str, JsonValue], str | None, str | None]] = []
        self._ai_services = ai
        self.ai_calls: AICallBuffer | None = None
        """This attempt's recorded AI calls (``ctx.ai``), made on first use."""
        self._ai: StageAI | None = None

    @property
    def ai(self) -> StageAI:
        """AI calls of this attempt: ``record`` (and ``generate_text`` /
        ``generate_object``), committed with the attempt's outcome (``kernel/ai.py``)."""
        if self._ai is None:
            self.ai_calls = AICallBuffer(
                run_id=self.run_id,
                workflow_id=self.workflow_id,
                stage_id=self.stage_id,
                step=None,
                attempt=self.attempt,
                now=self._now,
                recording=self._ai_services.recording,
            )
            runtime, run_id = self._runtime, self.run_id
            self._ai = StageAI(
                self.ai_calls, self._ai_services, lambda: runtime.ai_totals(run_id), self._now
            )
        return self._ai

    @property
    def recorded_ai_calls(self) -> bool:
        """Whether this attempt recorded any AI call (its commit must store them)."""
        return self.ai_calls is not None and bool(self.ai_calls.calls)

    @property
    def artifacts(self) -> Artifacts:
        """This stage's named blobs, made on first use: most stages never store one, and
        every stage gets a context."""
        if self._artifacts is None:
            self._artifacts = Artifacts(self._runtime, self.run_id, self.stage_id)
        return self._artifacts

    def require(self, stage_id: str) -> Any:
        """An earlier stage's output, parsed into its output model; raises if absent."""
        if stage_id not in self._outputs or self._outputs[stage_id] is None:
            raise MissingOutputError(
                f"stage {self.stage_id!r} requires output of {stage_id!r}, which is not available"
            )
        return self._parse(stage_id)

    def optional(self, stage_id: str) -> Any:
        """An earlier stage's output, or ``None`` if it has none."""
        if self._outputs.get(stage_id) is None:
            return None
        return self._parse(stage_id)

    def _parse(self, stage_id: str) -> Any:
        raw = self._outputs[stage_id]
        if type(raw) is MissingPayload:  # offloaded, and its blob is gone: not retried
            raise raw.error()
        stage = self._workflow.stage(stage_id)
        if stage is None:
            return raw
        return stage.output_adapter.validate_python(raw)

    def now(self) -> datetime:
        """The current time from the engine's ``Clock`` port (timezone-aware UTC), not the
        system clock: under ``TestEngine`` it is the virtual clock, so a body or a
        ``check_completion`` that compares times moves with ``advance_time``. Unlike a code
        workflow's ``ctx.now()`` it is not journaled: every attempt and every check reads
        the time afresh."""
        return self._now()

    def log(self, level: str, message: str, **fields: Any) -> None:
        """Buffered; committed with this attempt's outcome and echoed to structlog. The
        message is stored with any NUL character or lone surrogate escaped; ``fields``
        must be storable JSON (``kernel.limits``), else ``TreadleValidationError``."""
        stored = to_json(fields, "fields", what=f"ctx.log({safe_text(message)!r})")
        self.logs.append(BufferedLog(level.lower(), safe_text(message), stored, self._now()))

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress in [0, 1]; published as ``stage:progress`` without blocking."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be within [0, 1], got {fraction}")
        self._runtime.report_progress(fraction, None if message is None else safe_text(message))

    def heartbeat(self) -> None:
        """Tell the transport this stage is alive so its lease is not reaped."""
        self._runtime.heartbeat()

    def annotate(
        self,
        attributes: Mapping[str, JsonValue],
        *,
        actor: str | None = None,
        scope: str | None = None,
    ) -> None:
        """Attach provenance attributes, committed with the stage's outcome; refused here
        (``TreadleValidationError``) if they are not JSON scalars every backend stores."""
        validate_attributes(attributes)
        self.annotations.append((dict(attributes), actor, scope))
