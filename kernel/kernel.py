"""The command kernel: ``create_kernel(...)`` and ``Kernel.dispatch``.

The kernel is a table from command type to handler, plus the idempotency
wrapper every command shares (``Scope``, with ``Deps`` and ``KernelSettings`` in
``kernel/deps.py``, a floor below the handlers; re-exported here). It owns no timers,
threads or globals: time comes from the Clock port and ids from the id port.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast, overload

from pydantic import ValidationError as PydanticValidationError

import treadle.kernel.commands as c
from treadle.kernel.ai import AICall, AICostRow, AIGroupBy, AIServices, with_ai_totals
from treadle.kernel.annotations import Annotations
from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.deps import Deps, Handler, KernelSettings, Scope
from treadle.kernel.errors import (
    DuplicateError,
    InvalidCommandError,
    RunNotFoundError,
    UnknownCommandError,
)
from treadle.kernel.events import EventBase
from treadle.kernel.handlers import (
    jobs,
    leases,
    lifecycle,
    maintenance,
    messages,
    outbox,
    remote,
    retention,
    runs,
    schedules,
    suspended,
)
from treadle.kernel.handlers.workflows import query, update_reply_in
from treadle.kernel.ids import Uuid7Ids
from treadle.kernel.logging import KernelLogger, StdlibLogger
from treadle.kernel.model import JsonValue, Run, RunFilter, evolve
from treadle.kernel.registry import Registry
from treadle.kernel.schedule_client import Schedules
from treadle.kernel.workflows.fork import fork_run
from treadle.kernel.workflows.model import ForkResult, InboxMessage, JournalEntry

if TYPE_CHECKING:
    from datetime import datetime

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

__all__ = ["Deps", "Handler", "Kernel", "KernelSettings", "Scope", "create_kernel"]


def _handlers() -> dict[str, tuple[Handler, bool]]:
    """The one handler table: command type -> (handler, phased), checked against the
    command registry (``commands.COMMANDS``) so a command cannot lack a handler."""
    table: dict[str, tuple[Handler, bool]] = {
        "run.create": (runs.create, False),
        "run.createMany": (runs.create_many, False),
        "run.claimPending": (runs.claim_pending, False),
        "run.transition": (runs.transition, False),
        "run.cancel": (runs.cancel, False),
        "run.rerunFrom": (runs.rerun_from, False),
        "run.pause": (lifecycle.pause, False),
        "run.resume": (lifecycle.resume, False),
        "run.terminate": (lifecycle.terminate, False),
        "run.purge": (retention.purge, True),
        "job.execute": (jobs.execute, True),
        "job.release": (leases.release, False),
        "job.begin": (remote.begin, True),
        "job.complete": (remote.complete, True),
        "job.fail": (remote.fail, True),
        "job.suspend": (remote.suspend, True),
        "job.heartbeat": (remote.heartbeat, False),
        "stage.pollSuspended": (suspended.poll_suspended, True),
        "lease.reapStale": (maintenance.reap_stale, False),
        "run.reapStuck": (maintenance.reap_stuck, False),
        "outbox.flush": (outbox.flush, True),
        "plugin.replayDLQ": (outbox.replay_dlq, True),
        "run.signal": (messages.signal, False),
        "run.update": (messages.update, False),
        "review.decide": (messages.decide_review, False),
        "schedule.create": (schedules.create, False),
        "schedule.update": (schedules.update, False),
        "schedule.delete": (schedules.delete, False),
        "schedule.trigger": (schedules.trigger, False),
        "schedule.fireDue": (schedules.fire_due, True),
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
        self.annotations: Annotations = Annotations(deps)
        self.schedules: Schedules = Schedules(self.dispatch, deps.persistence)
        """Manage cron schedules (``kernel/schedule_client.py``)."""

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
    async def dispatch(self, command: c.RunPause) -> c.RunPauseResult: ...
    @overload
    async def dispatch(self, command: c.RunResume) -> c.RunResumeResult: ...
    @overload
    async def dispatch(self, command: c.RunTerminate) -> c.RunTerminateResult: ...
    @overload
    async def dispatch(self, command: c.RunPurge) -> c.RunPurgeResult: ...
    @overload
    async def dispatch(self, command: c.JobExecute) -> c.JobExecuteResult: ...
    @overload
    async def dispatch(self, command: c.JobRelease) -> c.JobReleaseResult: ...
    @overload
    async def dispatch(self, command: c.JobBegin) -> c.JobBeginResult: ...

    @overload
    async def dispatch(self, command: c.JobComplete) -> c.JobCompleteResult: ...

    @overload
    async def dispatch(self, command: c.JobFail) -> c.JobFailResult: ...

    @overload
    async def dispatch(self, command: c.JobSuspend) -> c.JobSuspendResult: ...

    @overload
    async def dispatch(self, command: c.JobHeartbeat) -> c.JobHeartbeatResult: ...

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
    async def dispatch(self, command: c.ScheduleCreate) -> c.ScheduleCreateResult: ...
    @overload
    async def dispatch(self, command: c.ScheduleUpdate) -> c.ScheduleUpdateResult: ...
    @overload
    async def dispatch(self, command: c.ScheduleDelete) -> c.ScheduleDeleteResult: ...
    @overload
    async def dispatch(self, command: c.ScheduleTrigger) -> c.ScheduleTriggerResult: ...
    @overload
    async def dispatch(self, command: c.ScheduleFireDue) -> c.ScheduleFireDueResult: ...
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
            run = await tx.runs.get(run_id)
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id!r}")
            if with_stages:
                run = evolve(run, {"stages": await tx.stages.for_run(run_id)})
            [run] = await with_ai_totals(tx, [run])
        return run

    async def list_runs(self, filter: RunFilter | None = None) -> list[Run]:
        async with self.deps.persistence.transaction() as tx:
            return await with_ai_totals(tx, await tx.runs.query(filter or RunFilter()))

    async def ai_calls(self, run_id: str, *, limit: int = 1000) -> list[AICall]:
        """The run's recorded AI calls, in the order they were recorded (``kernel/ai.py``)."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await tx.ai_calls.for_run(run_id, limit=limit)

    async def ai_costs(
        self,
        by: AIGroupBy,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        workflow_id: str | None = None,
        limit: int = 1000,
    ) -> list[AICostRow]:
        """AI calls made in ``[since, until)`` grouped by workflow, model, UTC day or run."""
        async with self.deps.persistence.transaction() as tx:
            return await tx.ai_calls.aggregate(
                by, since=since, until=until, workflow_id=workflow_id, limit=limit
            )

    async def events(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        async with self.deps.persistence.transaction() as tx:
            return await tx.outbox.events_for_run(run_id, after_sequence)

    # -- read side of code workflows ------------------------------------------------------
    async def query(self, run_id: str, key: str) -> JsonValue:
        """What a code workflow last published under ``key`` (``None`` if nothing yet).
        Read-only: it never wakes or changes the run."""
        return await query(self.deps, run_id, key)

    async def update_reply(self, run_id: str, update_id: str) -> tuple[bool, JsonValue]:
        """``(answered, reply)`` of an update sent with ``run.update``."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await update_reply_in(tx, run_id, update_id)

    async def journal(self, run_id: str) -> list[JournalEntry]:
        """A code workflow run's journal, in the order its body reached each call."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await tx.journal.entries(run_id)

    async def fork(
        self, run_id: str, from_step: str, *, idempotency_key: str | None = None
    ) -> ForkResult:
        """A new run of a code workflow that reuses ``run_id``'s journal before the first
        occurrence of step ``from_step`` (``"name#2"``: its second) and runs that step and
        everything after it afresh (``kernel/workflows/fork.py``). Not a command: the
        code-workflow counterpart of ``run.rerunFrom``, it writes in one transaction;
        with ``idempotency_key`` a repeated call returns the first call's fork."""
        return await fork_run(self.deps, run_id, from_step, idempotency_key=idempotency_key)

    async def inbox(self, run_id: str) -> list[InboxMessage]:
        """The signals delivered to a run, in arrival order, consumed or not."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await tx.inbox.for_run(run_id)

    @staticmethod
    async def _existing(tx: Transaction, run_id: str) -> None:
        if await tx.runs.get(run_id) is None:
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
    cron: CronCalendar | None = None,
    telemetry: Telemetry | None = None,
    ai: AIServices | None = None,
) -> Kernel:
    """Wire a kernel to its ports. ``registry`` may be a registry or an iterable of
    definitions; ``ids`` defaults to uuid7 stamped by ``clock``; ``cron`` (the calendar
    of cron schedules, ``adapters.cron.CroniterCalendar`` in every host) is needed only
    by the ``schedule.*`` commands. ``ai`` sets what of each AI call is stored and the
    client ``ctx.ai.generate_*`` uses (``kernel/ai.py``). ``telemetry``: spans of the work
    it runs (``ports/telemetry.py``; ``adapters.otel.OtelTelemetry``), none when omitted."""
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
        cron=cron,
        telemetry=telemetry,
        ai=ai or AIServices(),
    )
    return Kernel(deps)
