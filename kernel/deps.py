"""What every handler receives: ``Deps`` (the ports and settings), ``Scope`` (one
dispatch's idempotency) and ``KernelSettings``.

One floor below the handlers and the handler table (``kernel/kernel.py``), so that a
handler, a code-workflow helper or ``annotations`` can name them without importing the
module that imports every handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import treadle.kernel.commands as c
from treadle.kernel.ai import AIServices
from treadle.kernel.chains import Chains
from treadle.kernel.context import InFlight
from treadle.kernel.errors import IdempotencyInProgressError, WorkflowNotFoundError
from treadle.kernel.group_commit import GroupCommit
from treadle.kernel.logging import KernelLogger, StdlibLogger
from treadle.kernel.model import IdempotencyRecord, IdempotencyState
from treadle.kernel.workflows.sticky import StickyCache

if TYPE_CHECKING:
    from treadle.kernel.definitions import WorkflowDefinition
    from treadle.ports import (
        BlobStore,
        Clock,
        CronCalendar,
        EventSink,
        IdGenerator,
        JobTransport,
        KernelPlugin,
        Persistence,
        Scheduler,
        Telemetry,
        Transaction,
        WorkflowRegistry,
    )


@dataclass
class KernelSettings:
    """Tunables with the defaults of the product contract."""

    idempotency_reclaim_after: timedelta = timedelta(minutes=10)
    outbox_max_attempts: int = 3
    """Publication attempts before an event goes to the dead-letter queue."""
    outbox_retry_delay: timedelta = timedelta(seconds=1)
    """How long after a failed publication the event is tried again; doubled after each
    further failure (``outbox_retry_max_delay`` at most). Its run's later events wait."""
    outbox_retry_max_delay: timedelta = timedelta(minutes=5)
    """The longest wait between two publication attempts of one event."""
    step_backoff_suspend_after: timedelta = timedelta(seconds=30)
    """A code-workflow step whose retry delay is longer than this suspends the run on a
    durable timer; a shorter delay re-queues the activation to start after it. Neither
    holds a worker."""
    group_commit: bool = True
    """Commit stages that finish together in one transaction (``kernel/group_commit.py``):
    what lets one worker process keep up with PostgreSQL. Off, each commits alone."""
    version_recheck_interval: timedelta = timedelta(seconds=60)
    """How often the maintenance tick re-checks a code-workflow run blocked by a
    ``VersionMismatchError`` (its pinned version not registered here); once a worker
    with that version polls it, the run resumes by itself."""
    sticky_execution: bool = True
    """Keep the body of a code workflow that suspends alive in this kernel, so the run's
    next activation here resumes it where it waits instead of replaying its journal
    from the top: a wake-up then costs the same whatever the run's history
    (``kernel/workflows/sticky.py``). Off, every activation replays."""
    sticky_cache_size: int = 1000
    """How many parked bodies this kernel keeps (least recently parked dropped first;
    a dropped run replays on its next activation). 0 turns sticky execution off."""
    default_retention: timedelta | None = None
    """How long terminal runs of a workflow without its own ``retention`` are kept before
    the maintenance tick's ``run.purge`` deletes them; ``None``: forever."""


@dataclass
class Deps:
    """The ports and settings every handler receives."""

    persistence: Persistence
    job_transport: JobTransport
    blob_store: BlobStore
    event_sink: EventSink
    scheduler: Scheduler
    clock: Clock
    registry: WorkflowRegistry
    ids: IdGenerator
    plugins: tuple[KernelPlugin, ...] = ()
    settings: KernelSettings = field(default_factory=KernelSettings)
    logger: KernelLogger = field(default_factory=StdlibLogger)
    inflight: InFlight = field(default_factory=InFlight)
    """Cancellation tokens of the executions running in this process."""
    chains: Chains = field(default_factory=Chains)
    """Stages chained ``job.execute`` commits started, for the execution that follows."""
    commits: GroupCommit[Any, Any] = field(default_factory=GroupCommit)
    """Where concurrent ``job.execute`` phase-3 commits of this kernel meet (one group)."""
    sticky: StickyCache = field(default_factory=StickyCache)
    """Code-workflow bodies parked between activations (sticky execution)."""
    telemetry: Telemetry | None = None
    """Spans of stage, activation and step attempts (``ports/telemetry.py``); ``None``
    (the default) when tracing is off: the kernel then calls nothing."""
    ai: AIServices = field(default_factory=AIServices)
    """What of each AI call is stored, and the client ``ctx.ai.generate_*`` uses."""
    cron: CronCalendar | None = None
    """Cron arithmetic for schedules (``ports/cron.py``); without it the ``schedule.*``
    commands raise ``NotSupportedError``."""

    def workflow(self, workflow_id: str, version: str | None = None) -> WorkflowDefinition:
        """The definition for ``workflow_id``: ``version`` if the registry holds it (a run
        resumes under the version it pinned), else the one new runs start under."""
        wf = self.find_workflow(workflow_id, version)
        if wf is None:
            raise WorkflowNotFoundError(f"workflow {workflow_id!r} is not registered")
        return wf

    def find_workflow(
        self, workflow_id: str, version: str | None = None
    ) -> WorkflowDefinition | None:
        """As ``workflow``, ``None`` when the id is not registered. The result's version
        differs from ``version`` when this registry lacks it (a ``VersionMismatchError``
        for a code workflow run)."""
        if version is not None:
            exact = getattr(self.registry, "get_workflow_version", None)
            if exact is not None:
                found = exact(workflow_id, version)
                if found is not None:
                    return cast("WorkflowDefinition", found)
        return self.registry.get_workflow(workflow_id)


class Scope:
    """Idempotency for one dispatch. Handlers call ``claim`` in their first transaction
    and ``complete`` in their last, so a keyed command costs no extra commit."""

    def __init__(self, deps: Deps, command: c.CommandBase, *, phased: bool) -> None:
        fields = command.__dict__  # one read through pydantic's ``__getattr__`` hook
        key: str | None = fields["idempotency_key"]
        self.key = self.causation_id = key
        if self.key is not None and isinstance(command, c.RunCreate):
            # A run's idempotency key is unique per workflow, not globally: the cached
            # result of one workflow's start must not answer another's.
            self.key = f"{command.workflow_id}\x1f{self.key}"
        self.command_type: str = fields["type"]
        self._deps = deps
        self._phased = phased
        self.claimed = False

    async def claim(self, tx: Transaction) -> Any:
        """Returns the cached result of a completed replay, else ``None`` (and, for
        phased commands, marks the key in progress)."""
        if self.key is None:
            return None
        record = await tx.idempotency.get(self.key, self.command_type)
        now = self._deps.clock.now()
        if record is not None:
            if record.state is IdempotencyState.COMPLETED:
                return c.RESULT_TYPES[self.command_type].model_validate(record.result)
            if now - record.started_at < self._deps.settings.idempotency_reclaim_after:
                raise IdempotencyInProgressError(
                    f"{self.command_type} with idempotency key {self.key!r} is still executing"
                )
        if self._phased:
            await tx.idempotency.put(
                IdempotencyRecord(
                    key=self.key,
                    command_type=self.command_type,
                    state=IdempotencyState.IN_PROGRESS,
                    started_at=now,
                )
            )
            self.claimed = True
        return None

    async def complete(self, tx: Transaction, result: c.ResultBase) -> None:
        if self.key is None:
            return
        # ``model_dump(mode="json")`` without its keyword handling: this runs per stage.
        await tx.idempotency.put(
            IdempotencyRecord(
                key=self.key,
                command_type=self.command_type,
                state=IdempotencyState.COMPLETED,
                result=result.__pydantic_serializer__.to_python(result, mode="json"),
                started_at=self._deps.clock.now(),
            )
        )

    async def forget(self, tx: Transaction) -> None:
        """The command changed nothing a replay must be answered from: drop the in-progress
        mark in ``tx`` (a job a pause holds runs later under the same per-attempt key)."""
        if self.key is not None and self.claimed:
            await tx.idempotency.delete(self.key, self.command_type)
            self.claimed = False

    async def abandon(self) -> None:
        """The handler raised after an in-progress mark was committed: drop the mark so
        a retry with the same key is not refused for ten minutes."""
        if self.key is None or not self.claimed:
            return
        async with self._deps.persistence.transaction() as tx:
            record = await tx.idempotency.get(self.key, self.command_type)
            if record is not None and record.state is IdempotencyState.IN_PROGRESS:
                await tx.idempotency.delete(self.key, self.command_type)


Handler = Callable[[Deps, Any, Scope], Awaitable[Any]]
