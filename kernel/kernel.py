"""The command kernel: ``create_kernel(...)`` and ``Kernel.dispatch``.

The kernel is a table from command type to handler, plus the idempotency
wrapper every command shares. It owns no timers, threads or globals: time
comes from the Clock port and ids from the id port.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast, overload

from pydantic import ValidationError as PydanticValidationError

from treadle.kernel import commands as c
from treadle.kernel.chains import Chains
from treadle.kernel.context import InFlight
from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import (
    DuplicateError,
    IdempotencyInProgressError,
    InvalidCommandError,
    RunNotFoundError,
    UnknownCommandError,
    WorkflowNotFoundError,
)
from treadle.kernel.events import EventBase
from treadle.kernel.group_commit import GroupCommit
from treadle.kernel.ids import Uuid7Ids
from treadle.kernel.logging import KernelLogger, StdlibLogger
from treadle.kernel.model import (
    IdempotencyRecord,
    IdempotencyState,
    JsonValue,
    Run,
    RunFilter,
    evolve,
)
from treadle.kernel.registry import Registry
from treadle.kernel.workflows.fork import ForkResult
from treadle.kernel.workflows.model import InboxMessage, JournalEntry
from treadle.kernel.workflows.sticky import StickyCache

if TYPE_CHECKING:
    from treadle.kernel.annotations import Annotations
    from treadle.ports import (
        BlobStore,
        Clock,
        EventSink,
        IdGenerator,
        JobTransport,
        KernelPlugin,
        Persistence,
        Scheduler,
        Transaction,
        WorkflowRegistry,
    )


@dataclass
class KernelSettings:
    """Tunables with the defaults of the product contract."""

    idempotency_reclaim_after: timedelta = timedelta(minutes=10)
    outbox_max_attempts: int = 3
    """Publication attempts before an event goes to the dead-letter queue."""
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
        self.key = command.idempotency_key
        if self.key is not None and isinstance(command, c.RunCreate):
            # A run's idempotency key is unique per workflow, not globally: the cached
            # result of one workflow's start must not answer another's.
            self.key = f"{command.workflow_id}\x1f{self.key}"
        self.command_type: str = command.type  # type: ignore[attr-defined]
        self.causation_id = command.idempotency_key
        self._deps = deps
        self._phased = phased
        self.claimed = False

    async def claim(self, tx: Transaction) -> Any:
        """Returns the cached result of a completed replay, else ``None`` (and, for
        phased commands, marks the key in progress)."""
        if self.key is None:
            return None
        record = await tx.get_idempotency(self.key, self.command_type)
        now = self._deps.clock.now()
        if record is not None:
            if record.state is IdempotencyState.COMPLETED:
                return c.RESULT_TYPES[self.command_type].model_validate(record.result)
            if now - record.started_at < self._deps.settings.idempotency_reclaim_after:
                raise IdempotencyInProgressError(
                    f"{self.command_type} with idempotency key {self.key!r} is still executing"
                )
        if self._phased:
            await tx.put_idempotency(
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
        await tx.put_idempotency(
            IdempotencyRecord(
                key=self.key,
                command_type=self.command_type,
                state=IdempotencyState.COMPLETED,
                result=result.__pydantic_serializer__.to_python(result, mode="json"),
                started_at=self._deps.clock.now(),
            )
        )

    async def abandon(self) -> None:
        """The handler raised after an in-progress mark was committed: drop the mark so
        a retry with the same key is not refused for ten minutes."""
        if self.key is None or not self.claimed:
            return
        async with self._deps.persistence.transaction() as tx:
            record = await tx.get_idempotency(self.key, self.command_type)
            if record is not None and record.state is IdempotencyState.IN_PROGRESS:
                await tx.delete_idempotency(self.key, self.command_type)


Handler = Callable[[Deps, Any, Scope], Awaitable[Any]]


def _handlers() -> dict[str, tuple[Handler, bool]]:
    """The one handler table: command type -> (handler, phased), checked against the
    command registry (``commands.COMMANDS``) so a command cannot lack a handler."""
    from treadle.kernel.handlers import jobs, leases, maintenance, messages, outbox, runs, suspended

    table: dict[str, tuple[Handler, bool]] = {
        "run.create": (runs.create, False),
        "run.createMany": (runs.create_many, False),
        "run.claimPending": (runs.claim_pending, False),
        "run.transition": (runs.transition, False),
        "run.cancel": (runs.cancel, False),
        "run.rerunFrom": (runs.rerun_from, False),
        "job.execute": (jobs.execute, True),
        "job.release": (leases.release, False),
        "stage.pollSuspended": (suspended.poll_suspended, True),
        "lease.reapStale": (maintenance.reap_stale, False),
        "run.reapStuck": (maintenance.reap_stuck, False),
        "outbox.flush": (outbox.flush, True),
        "plugin.replayDLQ": (outbox.replay_dlq, True),
        "run.signal": (messages.signal, False),
        "run.update": (messages.update, False),
        "review.decide": (messages.decide_review, False),
    }
    _check_handlers(table)
    return table


def _check_handlers(table: Mapping[str, object]) -> None:
    """Refuse a handler table that disagrees with the command registry: a registered
    command without a handler would pass validation and then fail with a ``KeyError``."""
    missing = sorted(c.COMMAND_TYPES.keys() - table.keys())
    extra = sorted(table.keys() - c.COMMAND_TYPES.keys())
    if missing or extra:
        raise RuntimeError(
            "the handler table disagrees with commands.COMMANDS: "
            f"no handler for {missing}, handlers for unregistered {extra}"
        )


class Kernel:
    """Dispatches commands against injected ports. Create with ``create_kernel``."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.handlers = _handlers()
        from treadle.kernel.annotations import Annotations

        self.annotations: Annotations = Annotations(deps)

    # Typed overloads so callers get the precise result model back.
    @overload
    async def dispatch(self, command: c.RunCreate) -> c.RunCreateResult: ...
    @overload
    async def dispatch(self, command: c.RunCreateMany) -> c.RunCreateManyResult: ...
    @overload
    async def dispatch(self, command: c.RunClaimPending) -> c.RunClaimPendingResult: ...
    @overload
    async def dispatch(self, command: c.RunTransition) -> c.RunTransitionResult: ...
    @overload
    async def dispatch(self, command: c.RunCancel) -> c.RunCancelResult: ...
    @overload
    async def dispatch(self, command: c.RunRerunFrom) -> c.RunRerunFromResult: ...
    @overload
    async def dispatch(self, command: c.JobExecute) -> c.JobExecuteResult: ...
    @overload
    async def dispatch(self, command: c.JobRelease) -> c.JobReleaseResult: ...
    @overload
    async def dispatch(self, command: c.StagePollSuspended) -> c.StagePollSuspendedResult: ...
    @overload
    async def dispatch(self, command: c.LeaseReapStale) -> c.LeaseReapStaleResult: ...
    @overload
    async def dispatch(self, command: c.RunReapStuck) -> c.RunReapStuckResult: ...
    @overload
    async def dispatch(self, command: c.OutboxFlush) -> c.OutboxFlushResult: ...
    @overload
    async def dispatch(self, command: c.PluginReplayDLQ) -> c.PluginReplayDLQResult: ...
    @overload
    async def dispatch(self, command: c.RunSignal) -> c.RunSignalResult: ...
    @overload
    async def dispatch(self, command: c.RunUpdate) -> c.RunUpdateResult: ...
    @overload
    async def dispatch(self, command: c.ReviewDecide) -> c.ReviewDecideResult: ...
    @overload
    async def dispatch(self, command: c.CommandBase | Mapping[str, Any]) -> c.ResultBase: ...

    async def dispatch(self, command: c.CommandBase | Mapping[str, Any]) -> c.ResultBase:
        """Validate (if a mapping), then run the command's handler under idempotency."""
        # The isinstance test first: most commands arrive built, and this runs per stage.
        cmd = command if isinstance(command, c.CommandBase) else self.parse(command)
        handler, phased = self.handlers[cmd.type]  # type: ignore[attr-defined]
        scope = Scope(self.deps, cmd, phased=phased)
        try:
            result: c.ResultBase = await handler(self.deps, cmd, scope)
            return result
        except DuplicateError:
            if scope.key is None or phased:
                raise
            # Two concurrent first deliveries of one key: the loser reads the winner's result.
            return cast(
                "c.ResultBase", await handler(self.deps, cmd, Scope(self.deps, cmd, phased=False))
            )
        except BaseException:
            await scope.abandon()
            raise

    def close(self) -> None:
        """Drop what this kernel holds in memory between commands: the parked bodies of
        sticky execution (their runs replay wherever they resume next). Idempotent; the
        ports are the caller's to close."""
        self.deps.sticky.clear()

    @staticmethod
    def parse(command: c.CommandBase | Mapping[str, Any]) -> c.CommandBase:
        if isinstance(command, c.CommandBase):
            return command
        if not isinstance(command, Mapping):
            raise InvalidCommandError(f"a command must be a mapping, got {type(command).__name__}")
        kind = command.get("type")
        if kind not in c.COMMAND_TYPES:
            raise UnknownCommandError(
                f"unknown command type {kind!r}; known types: {sorted(c.COMMAND_TYPES)}"
            )
        try:
            return c.COMMAND_ADAPTER.validate_python(dict(command))
        except PydanticValidationError as exc:
            raise InvalidCommandError.from_pydantic(f"invalid {kind} command", exc) from None

    # -- read side ----------------------------------------------------------
    async def get_run(self, run_id: str, *, with_stages: bool = True) -> Run:
        """The run with its stages; ``RunNotFoundError`` if there is none."""
        async with self.deps.persistence.transaction() as tx:
            run = await tx.get_run(run_id)
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id!r}")
            if with_stages:
                run = evolve(run, {"stages": await tx.get_stages(run_id)})
        return run

    async def list_runs(self, filter: RunFilter | None = None) -> list[Run]:
        async with self.deps.persistence.transaction() as tx:
            return await tx.list_runs(filter or RunFilter())

    async def events(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        async with self.deps.persistence.transaction() as tx:
            return await tx.events_for_run(run_id, after_sequence)

    # -- read side of code workflows ------------------------------------------------------
    async def query(self, run_id: str, key: str) -> JsonValue:
        """What a code workflow last published under ``key`` (``None`` if nothing yet).
        Read-only: it never wakes or changes the run."""
        from treadle.kernel.handlers.workflows import query

        return await query(self.deps, run_id, key)

    async def update_reply(self, run_id: str, update_id: str) -> tuple[bool, JsonValue]:
        """``(answered, reply)`` of an update sent with ``run.update``."""
        from treadle.kernel.handlers.workflows import update_reply_in

        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await update_reply_in(tx, run_id, update_id)

    async def journal(self, run_id: str) -> list[JournalEntry]:
        """A code workflow run's journal, in the order its body reached each call."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await tx.get_journal(run_id)

    async def fork(
        self, run_id: str, from_step: str, *, idempotency_key: str | None = None
    ) -> ForkResult:
        """A new run of a code workflow that reuses ``run_id``'s journal before the first
        occurrence of step ``from_step`` (``"name#2"``: its second) and runs that step and
        everything after it afresh (``kernel/workflows/fork.py``). Not a command: the
        code-workflow counterpart of ``run.rerunFrom``, it writes in one transaction;
        with ``idempotency_key`` a repeated call returns the first call's fork."""
        from treadle.kernel.workflows.fork import fork_run

        return await fork_run(self.deps, run_id, from_step, idempotency_key=idempotency_key)

    async def inbox(self, run_id: str) -> list[InboxMessage]:
        """The signals delivered to a run, in arrival order, consumed or not."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await tx.list_signals(run_id)

    @staticmethod
    async def _existing(tx: Transaction, run_id: str) -> None:
        if await tx.get_run(run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id!r}")


def create_kernel(
    *,
    persistence: Persistence,
    job_transport: JobTransport,
    blob_store: BlobStore,
    event_sink: EventSink,
    scheduler: Scheduler,
    clock: Clock,
    registry: WorkflowRegistry | Iterable[WorkflowDefinition],
    ids: IdGenerator | None = None,
    plugins: Iterable[KernelPlugin] = (),
    settings: KernelSettings | None = None,
    logger: KernelLogger | None = None,
) -> Kernel:
    """Wire a kernel to its ports. ``registry`` may be a registry or an iterable of
    definitions; ``ids`` defaults to uuid7 stamped by ``clock``."""
    if not hasattr(registry, "get_workflow"):
        registry = Registry(registry)
    deps = Deps(
        persistence=persistence,
        job_transport=job_transport,
        blob_store=blob_store,
        event_sink=event_sink,
        scheduler=scheduler,
        clock=clock,
        registry=cast("WorkflowRegistry", registry),
        ids=ids or Uuid7Ids(clock.now),
        plugins=tuple(plugins),
        settings=settings or KernelSettings(),
        logger=logger or StdlibLogger(),
    )
    return Kernel(deps)
