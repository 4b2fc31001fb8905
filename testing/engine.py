"""``TestEngine``: the real kernel on in-memory adapters with a virtual clock.

It drives the worker's own code, ``runtime.maintenance_tick`` and
``runtime.execute_job``, round after round until nothing is left to do at the current
virtual time; ``advance_time`` then jumps the clock from one due moment to the next, so
a pipeline that backs off for an hour or waits a day finishes in milliseconds. Only the
loop differs from the worker's: rounds instead of timers and wake-ups.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from treadle.adapters.cron import CroniterCalendar
from treadle.adapters.logging import structlog_logger
from treadle.adapters.memory import (
    CollectingEventSink,
    InMemoryBlobStore,
    InMemoryJobTransport,
    InMemoryPersistence,
    InMemoryScheduler,
)
from treadle.kernel import commands as c
from treadle.kernel.ai import AICall, AIRecording, AIServices
from treadle.kernel.arguments import start_command
from treadle.kernel.context import StageContext
from treadle.kernel.definitions import StageDefinition, WorkflowDefinition
from treadle.kernel.errors import (
    RunCancelledError,
    RunFailedError,
    StageNotFoundError,
    TransientStorageError,
    TreadleError,
)
from treadle.kernel.events import EventBase
from treadle.kernel.kernel import Kernel, KernelSettings, create_kernel
from treadle.kernel.model import JobStatus, LogRecord, Run, RunStatus
from treadle.kernel.registry import Registry, remote_stages
from treadle.kernel.schedule_client import Schedules, declared_schedules
from treadle.kernel.schedules import ScheduleDefinition
from treadle.kernel.workflows import CodeWorkflowDefinition, JournalEntry, WorkflowContext
from treadle.kernel.workflows.deadline import EXECUTION_TIMEOUT
from treadle.runtime.backends import ai_services
from treadle.runtime.jobs import execute_job
from treadle.runtime.starts import start_traced
from treadle.runtime.tick import TickReport, maintenance_tick
from treadle.testing.chaos import Chaos
from treadle.testing.clock import DEFAULT_START, FakeClock

if TYPE_CHECKING:
    from treadle.ports import Telemetry

_REAP_ALL = timedelta(seconds=-1)
"""The tick's stale-lease threshold: between two rounds no job is executing, so every
lease left is one that lost its commit and its release to a failure."""


def _always() -> bool:
    return True


def _tick_moved(report: TickReport) -> bool:
    """Whether a tick did anything (a failed step counts: the next round retries it)."""
    if not report.ok:
        return True
    claim, poll = report.result("claim"), report.result("poll_suspended")
    stale, flush = report.result("reap_stale"), report.result("flush_outbox")
    stuck = report.result("reap_stuck")
    return bool(
        claim.get("claimed")
        or poll.get("checked")
        or poll.get("timed_out_workflow_run_ids")
        or report.result("scheduled").get("due")
        or report.result("schedules").get("schedules")
        or stale.get("released")
        or stale.get("failed")
        or flush.get("published")
        or flush.get("failed")
        or stuck.get("transitioned")
        or stuck.get("failed")
        or report.result("purge").get("purged")
    )


class StageMock:
    """Replacement body for a stage, recording every call's context."""

    def __init__(self, stage_id: str, fn: Callable[..., Any] | Any) -> None:
        self.stage_id = stage_id
        self._fn = fn
        self.calls: list[StageContext[Any, Any]] = []

    @property
    def call_count(self) -> int:
        return len(self.calls)

    async def __call__(self, ctx: StageContext[Any, Any]) -> Any:
        self.calls.append(ctx)
        if not callable(self._fn):
            return self._fn
        value = self._fn(ctx)
        if inspect.isawaitable(value):
            value = await value
        return value


class StepCall:
    """One call of a mocked code-workflow step: its arguments and attempt number."""

    __slots__ = ("args", "attempt", "idempotency_key")

    def __init__(self, args: tuple[Any, ...], attempt: int, idempotency_key: str) -> None:
        self.args = args
        self.attempt = attempt
        self.idempotency_key = idempotency_key

    def __repr__(self) -> str:
        return f"StepCall(args={self.args!r}, attempt={self.attempt})"


class StepMock:
    """Replacement function for a code-workflow step, recording every call. A replayed
    step is not called (its result comes from the journal), so ``calls`` counts real
    executions, the number a crash test asserts on."""

    def __init__(self, name: str, fn: Callable[..., Any] | Any) -> None:
        self.name = name
        self._fn = fn
        self.calls: list[StepCall] = []

    @property
    def call_count(self) -> int:
        return len(self.calls)

    async def __call__(self, *args: Any) -> Any:
        info = WorkflowContext.current_step()
        self.calls.append(
            StepCall(args, info.attempt if info else 0, info.idempotency_key if info else "")
        )
        if not callable(self._fn):
            return self._fn
        value = self._fn(*args)
        if inspect.isawaitable(value):
            value = await value
        return value


class _MockingRegistry:
    """Serves definitions with mocked stage bodies swapped in."""

    def __init__(self, workflows: Iterable[WorkflowDefinition]) -> None:
        self.inner = Registry(workflows)
        self.mocks: dict[str, StageMock] = {}
        self.step_mocks: dict[str, StepMock] = {}
        self._cache: dict[tuple[str, str], WorkflowDefinition] = {}

    def ids(self) -> list[str]:
        return self.inner.ids()

    def __iter__(self) -> Iterator[WorkflowDefinition]:
        """Every registered definition (as ``Registry``), for checks over all of them."""
        return iter(self.inner)

    def local_queues(self) -> list[str] | None:
        """The queues the harness runs: all (``None``) unless some hold remote stages
        that no mock stands in for, which wait for a remote worker (``job.begin``)."""
        waiting = {
            queue
            for queue, ids in remote_stages(self.inner).items()
            if any(stage_id not in self.mocks for stage_id in ids)
        }
        if not waiting:
            return None
        every = {queue for wf in self.inner for queue in wf.queues}
        return sorted(every - waiting)

    def register(self, workflow: WorkflowDefinition) -> None:
        self.inner.register(workflow)
        self._cache.clear()

    def unregister(self, workflow_id: str, version: str | None = None) -> None:
        self.inner.unregister(workflow_id, version)
        self._cache.clear()

    def get_workflow(self, workflow_id: str) -> WorkflowDefinition | None:
        return self._mocked(self.inner.get_workflow(workflow_id))

    def get_workflow_version(self, workflow_id: str, version: str) -> WorkflowDefinition | None:
        return self._mocked(self.inner.get_workflow_version(workflow_id, version))

    def _mocked(self, found: WorkflowDefinition | None) -> WorkflowDefinition | None:
        if found is None:
            return None
        key = (found.id, found.version)
        wf = self._cache.get(key)
        if wf is None:
            wf = found
            if isinstance(wf, CodeWorkflowDefinition):
                # The live dict: a step mocked after the run started applies at once.
                wf = wf.with_step_overrides(self.step_mocks)
            elif any(s in self.mocks for s in wf.stages):
                wf = self._with_mocks(wf)
            self._cache[key] = wf
        return wf

    def _with_mocks(self, wf: WorkflowDefinition) -> WorkflowDefinition:
        def swap(stage: StageDefinition) -> StageDefinition:
            mock = self.mocks.get(stage.id)
            return stage.with_fn(mock) if mock is not None else stage

        groups = tuple(tuple(swap(s) for s in group) for group in wf.groups)
        stages = {s.id: s for group in groups for s in group}
        return dataclasses.replace(wf, groups=groups, stages=stages)

    def mock(self, stage_id: str, fn: Callable[..., Any] | Any) -> StageMock:
        if not any(stage_id in wf.stages for wf in self.inner):
            raise StageNotFoundError(f"no registered workflow has a stage {stage_id!r}")
        self.mocks[stage_id] = StageMock(stage_id, fn)
        self._cache.clear()
        return self.mocks[stage_id]


class RunHandle:
    """A started run: ``run_id``, and ``await handle.result()`` to drive it to the end."""

    def __init__(self, engine: TestEngine, run_id: str) -> None:
        self._engine = engine
        self.run_id = run_id

    async def result(self) -> Any:
        """Run until idle; the output if COMPLETED, else ``RunFailedError`` /
        ``RunCancelledError``; a run still waiting raises ``TreadleError``. A run that
        continued as new is followed to the last run of its chain."""
        await self._engine.run_until_idle()
        run = await self._engine.get_run(self.run_id)
        while run.continued_as is not None:
            run = await self._engine.get_run(run.continued_as)
        if run.status is RunStatus.COMPLETED:
            return run.output
        if run.status is RunStatus.FAILED:
            raise RunFailedError(run.id, run.error)
        if run.status is RunStatus.CANCELLED:
            raise RunCancelledError(run.id, run.error)
        raise TreadleError(
            f"run {run.id!r} is {run.status.value} at virtual time {self._engine.clock.now()}; "
            "advance_time() to let it continue"
        )


class TestEngine:
    """See the module docstring. Every part is public for tests to inspect."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        workflows: Iterable[WorkflowDefinition] = (),
        *,
        start: datetime | None = None,
        clock: FakeClock | None = None,
        chaos: Chaos | None = None,
        worker_id: str = "test-worker",
        settings: KernelSettings | None = None,
        plugins: Iterable[Any] = (),
        ids: Any = None,
        chain: bool = True,
        schedules: Iterable[ScheduleDefinition] = (),
        telemetry: Telemetry | None = None,
        ai: AIServices | AIRecording | None = None,
    ) -> None:
        # ``clock`` lets a caller share one FakeClock with the engine (the pytest plugin's
        # ``fake_clock`` is ``treadle_engine.clock``): a second clock would be a second
        # "now" that advance_time never moves.
        if clock is not None and start is not None:
            raise ValueError("TestEngine takes start or clock, not both (clock has its own time)")
        self.clock = clock if clock is not None else FakeClock(start or DEFAULT_START)
        self.persistence = InMemoryPersistence()
        self.job_transport = InMemoryJobTransport(self.persistence)
        self.blob_store = InMemoryBlobStore()
        self.event_sink = CollectingEventSink()
        self.scheduler = InMemoryScheduler()
        workflows = list(workflows)
        self.registry = _MockingRegistry(workflows)
        self.chaos = chaos
        self.worker_id = worker_id
        # Chain stages as the production ``Worker`` does (``JobExecute.chain``): a commit
        # that advances a run leases and starts the run's next stage, which the same task
        # executes at once instead of a later round dequeuing it. ``chain=False`` makes
        # every stage wait for the next round's dequeue (strict priority order).
        self.chain = chain
        self.transient_failures = 0
        self._errors: list[Exception] = []
        self._log = structlog_logger("treadle.runtime", worker_id=worker_id)
        self.kernel: Kernel = create_kernel(
            persistence=chaos.wrap(self.persistence) if chaos else self.persistence,
            job_transport=self.job_transport,
            blob_store=self.blob_store,
            event_sink=self.event_sink,
            scheduler=self.scheduler,
            clock=self.clock,
            registry=self.registry,
            ids=ids,
            plugins=plugins,
            settings=settings,
            logger=structlog_logger(worker_id=worker_id),
            cron=CroniterCalendar(),
            telemetry=telemetry,
            ai=ai_services(ai),
        )
        self._unsynced: list[ScheduleDefinition] = [
            *declared_schedules(workflows),
            *schedules,
        ]
        """Declared schedules not created yet: the first round (``run_until_idle``,
        ``advance_time``) creates them, at the virtual time it runs at."""

    # -- authoring helpers --------------------------------------------------------
    def register(self, workflow: WorkflowDefinition) -> None:
        self.registry.register(workflow)
        self._unsynced.extend(workflow.schedules)

    @property
    def schedules(self) -> Schedules:
        """Manage cron schedules, as ``engine.schedules`` (declared ones exist once the
        engine has run a round: ``run_until_idle`` or ``advance_time``)."""
        return self.kernel.schedules

    def mock_stage(self, stage_id: str, fn: Callable[..., Any] | Any) -> StageMock:
        """Replace a stage's body (a function of ``ctx``, or a constant output)."""
        return self.registry.mock(stage_id, fn)

    def mock_step(self, name: str, fn: Callable[..., Any] | Any) -> StepMock:
        """Replace a code-workflow step's function (called with the step's arguments), or
        give a constant result; ``calls`` records each real execution."""
        mock = StepMock(name, fn)
        self.registry.step_mocks[name] = mock
        return mock

    @property
    def events(self) -> list[EventBase]:
        """Events published through the outbox so far, in publication order."""
        return self.event_sink.events

    # -- client operations ------------------------------------------------------------
    async def dispatch(self, command: c.CommandBase | Mapping[str, Any]) -> Any:
        return await self.kernel.dispatch(command)

    async def start(
        self,
        workflow_id: str,
        input: Any = None,
        *,
        config: Mapping[str, Any] | None = None,
        priority: int = 5,
        idempotency_key: str | None = None,
        run_id: str | None = None,
        search_attributes: Mapping[str, Any] | None = None,
        execution_timeout: timedelta | float | None = None,
        concurrency_key: str | None = None,
        max_cost: Decimal | float | str | None = None,
    ) -> RunHandle:
        """Create a run (``run.create``), checking the arguments as ``Engine.start`` does:
        a bad one is the same ``TreadleValidationError`` naming it, and nothing is written."""
        command = start_command(
            "TestEngine",
            workflow_id,
            input,
            idempotency_key=idempotency_key,
            priority=priority,
            config=config,
            run_id=run_id,
            search_attributes=search_attributes,
            execution_timeout=execution_timeout,
            concurrency_key=concurrency_key,
            max_cost=max_cost,
        )
        telemetry = self.kernel.deps.telemetry
        if telemetry is None:
            result = await self.kernel.dispatch(command)
        else:  # as Engine.start: the caller's trace context goes with the run
            result = await start_traced(
                telemetry,
                command,
                self.kernel.dispatch,
                lambda r: (r.workflow_run_id, r.created),
            )
        return RunHandle(self, result.workflow_run_id)

    async def get_run(self, run_id: str) -> Run:
        return await self.kernel.get_run(run_id)

    async def ai_calls(self, run_id: str) -> list[AICall]:
        """``Engine.ai_calls``: the run's recorded AI calls, in order."""
        return await self.kernel.ai_calls(run_id)

    async def cancel(self, run_id: str, reason: str | None = None) -> bool:
        result = await self.kernel.dispatch(c.RunCancel(workflow_run_id=run_id, reason=reason))
        return result.cancelled

    async def pause(self, run_id: str, reason: str | None = None) -> bool:
        """``Engine.pause``: no new stage or step of the run starts until ``resume``."""
        result = await self.kernel.dispatch(c.RunPause(workflow_run_id=run_id, reason=reason))
        return result.paused

    async def resume(self, run_id: str, reason: str | None = None) -> bool:
        result = await self.kernel.dispatch(c.RunResume(workflow_run_id=run_id, reason=reason))
        return result.resumed

    async def terminate(self, run_id: str, reason: str | None = None) -> bool:
        """``Engine.terminate``: the run ends now, without compensations."""
        command = c.RunTerminate(workflow_run_id=run_id, reason=reason)
        return (await self.kernel.dispatch(command)).terminated

    async def fork(
        self, run_id: str, from_step: str, *, idempotency_key: str | None = None
    ) -> RunHandle:
        """A new run reusing ``run_id``'s journal before step ``from_step`` (as
        ``Engine.fork``); ``run_until_idle`` or ``result()`` then runs the rest."""
        result = await self.kernel.fork(run_id, from_step, idempotency_key=idempotency_key)
        return RunHandle(self, result.workflow_run_id)

    async def signal(self, run_id: str, name: str, payload: Any = None) -> bool:
        """Deliver a signal to a code workflow (``run.signal``); ``run_until_idle`` or
        ``advance_time`` then lets a waiting body resume."""
        result = await self.kernel.dispatch(
            c.RunSignal(workflow_run_id=run_id, name=name, payload=payload)
        )
        return result.delivered

    async def update(self, run_id: str, name: str, payload: Any = None) -> Any:
        """Send an update (``run.update``), run until idle, and return the body's reply;
        ``TreadleError`` if the body has not answered at the current virtual time."""
        result = await self.kernel.dispatch(
            c.RunUpdate(workflow_run_id=run_id, name=name, payload=payload)
        )
        await self.run_until_idle()
        answered, reply = await self.kernel.update_reply(run_id, result.update_id)
        if not answered:
            raise TreadleError(
                f"update {name!r} of run {run_id!r} is unanswered at virtual time "
                f"{self.clock.now()}"
            )
        return reply

    async def query(self, run_id: str, key: str) -> Any:
        """What the run last published with ``ctx.publish(key, ...)``."""
        return await self.kernel.query(run_id, key)

    async def journal(self, run_id: str) -> list[JournalEntry]:
        """The run's journal, in the order its body reached each call."""
        return await self.kernel.journal(run_id)

    async def logs(self, run_id: str) -> list[LogRecord]:
        async with self.persistence.transaction() as tx:
            return await tx.logs.for_run(run_id)

    # -- driving ----------------------------------------------------------------------
    def _on_error(self, exc: Exception, where: str) -> None:
        """What the runtime swallowed (it logs, reports and retries): a transient storage
        failure (chaos) is counted, and the next round retries it; an execution that
        raised a ``TreadleError`` is the kernel's business (the runtime released the job
        and ran the transition safety net); anything else is re-raised at the end of the
        round, so a bug or a missing workflow surfaces in the test."""
        if isinstance(exc, TransientStorageError):
            self.transient_failures += 1
        elif not (where == "execute" and isinstance(exc, TreadleError)):
            self._errors.append(exc)

    def _raise_errors(self) -> None:
        errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    async def _step(self) -> bool:
        """One round of what a worker does, through ``runtime``'s own code: one
        ``maintenance_tick`` (claim, poll suspended, due scheduled commands, reap stale
        leases, flush the outbox, reap stuck runs), then every due job leased and run
        through ``execute_job`` (the worker's job path: per-attempt keys, chaining, the
        ``run.transition`` safety net). True if anything moved. Nothing is in flight
        while the tick runs, so any lease it finds lost its commit and its release to a
        failure: the tick releases it at once (a stale threshold below zero)."""
        kernel = self.kernel
        if self._unsynced:  # declared schedules, created at the virtual time of this round
            pending, self._unsynced = self._unsynced, []
            await kernel.schedules.sync(pending)
        report = await maintenance_tick(
            kernel,
            worker_id=self.worker_id,
            stale_threshold=_REAP_ALL,
            max_claims=1000,
            max_checks=1000,
            max_events=10_000,
            max_scheduled=10_000,
            max_purged=1000,
            logger=self._log,
            on_error=self._on_error,
        )
        self._raise_errors()
        moved = _tick_moved(report)
        leased = await self.job_transport.dequeue(
            self.worker_id, self.clock.now(), limit=1000, queues=self.registry.local_queues()
        )
        if leased:
            moved = True
            chain = _always if self.chain else None
            await asyncio.gather(
                *(
                    execute_job(
                        kernel,
                        job,
                        worker_id=self.worker_id,
                        logger=self._log,
                        chain=chain,
                        on_error=self._on_error,
                    )
                    for job in leased
                )
            )
            self._raise_errors()
        return moved

    async def run_until_idle(self, *, max_rounds: int = 10_000) -> None:
        """Drive the engine at the current virtual time until nothing moves."""
        for _ in range(max_rounds):
            if not await self._step():
                return
        raise TreadleError(f"engine still busy after {max_rounds} rounds (livelock?)")

    async def next_due_at(self) -> datetime | None:
        candidates = [
            await self._next_job_at(),
            self.persistence.next_suspended_poll_at(),
            self.persistence.next_timer_at(EXECUTION_TIMEOUT),
            await self.scheduler.next_due_at(),
            await self._next_fire_at(),
        ]
        return min((t for t in candidates if t is not None), default=None)

    async def _next_job_at(self) -> datetime | None:
        """The next due job the harness runs: jobs on queues of remote stages wait for
        a remote worker (``job.begin``), so their due times are not the harness's."""
        served = self.registry.local_queues()
        if served is None:
            return await self.job_transport.next_due_at()
        return min(
            (
                job.next_poll_at
                for job in self.job_transport.jobs.values()
                if job.status is JobStatus.QUEUED and job.queue in served
            ),
            default=None,
        )

    async def _next_fire_at(self) -> datetime | None:
        """The next fire time still ahead: one already past did not fire in the round
        just run (its workflow is not registered here, its input no longer validates),
        and stopping at it again would loop."""
        now = self.clock.now()
        return min(
            (
                s.next_fire_at
                for s in self.persistence.schedules.values()
                if not s.paused and s.next_fire_at is not None and s.next_fire_at > now
            ),
            default=None,
        )

    async def advance_time(self, delta: timedelta | float) -> None:
        """Move the virtual clock forward, stopping at every due retry, poll and timer
        on the way and running the engine until idle at each."""
        if not isinstance(delta, timedelta):
            delta = timedelta(seconds=delta)
        target = self.clock.now() + delta
        await self.run_until_idle()
        for _ in range(100_000):
            due = await self.next_due_at()
            if due is None or due > target:
                break
            if due > self.clock.now():
                self.clock.set(due)
            await self.run_until_idle()
        else:
            raise TreadleError("advance_time: work keeps falling due without finishing")
        self.clock.set(target)
        await self.run_until_idle()
