"""``Engine``: the client facade of DESIGN.md §3.3.

A thin layer over the kernel and the ports ``open_backend`` picks for a URL.
It adds what an application needs and the kernel deliberately lacks: argument
checks that name the argument, waiting for a run's result, tailing a run's
events, and an in-process worker that a ``start`` wakes at once. Every state
change is still one kernel command, so a run started here is indistinguishable
from one started by the CLI or another process.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import functools
import math
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from treadle.kernel import arguments
from treadle.kernel import commands as c
from treadle.kernel.ai import AICall, AICostRow, AIRecording
from treadle.kernel.arguments import build_command as _build
from treadle.kernel.arguments import count as _count
from treadle.kernel.arguments import invalid as _invalid
from treadle.kernel.arguments import mapping as _mapping
from treadle.kernel.arguments import non_empty as _non_empty
from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import (
    InvalidStateError,
    NotSupportedError,
    RunCancelledError,
    RunFailedError,
    TreadleError,
)
from treadle.kernel.handlers.runs import validate_items
from treadle.kernel.kernel import Kernel, KernelSettings
from treadle.kernel.limits import to_duration, validate_attributes
from treadle.kernel.model import (
    Annotation,
    JsonValue,
    LogRecord,
    MissingPayload,
    QueueInfo,
    Run,
    RunFilter,
    RunStatus,
)
from treadle.kernel.schedule_client import Schedules, declared_schedules
from treadle.kernel.schedules import ScheduleDefinition
from treadle.kernel.workflows.model import JournalEntry, Timer
from treadle.runtime.backends import DEFAULT_PAYLOAD_MAX_BYTES, Backend, open_backend
from treadle.runtime.options import WorkerOptions
from treadle.runtime.outbox_view import OutboxView
from treadle.runtime.run_waiters import RunWaiters
from treadle.runtime.starts import start_traced
from treadle.runtime.worker import SlotLoan, Worker

if TYPE_CHECKING:
    from treadle.kernel.events import EventBase
    from treadle.ports import BlobStore, Clock, EventSink, IdGenerator, KernelPlugin, Telemetry

__all__ = ["Engine", "RunHandle", "StartItem"]

StartItem = c.RunCreateItem
"""One run for ``Engine.start_many`` (a mapping with the same keys does as well)."""

START_MANY_BATCH = 1_000
"""Items per ``run.createMany`` that ``Engine.start_many`` sends."""

_RESULT_FIRST_POLL = 0.005
_RESULT_MAX_POLL = 1.0


def _seconds(value: Any, argument: str, *, allow_zero: bool = True) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise _invalid(argument, f"must be seconds (a number) or a timedelta, got {value!r}")
    if math.isnan(seconds):
        raise _invalid(argument, "must be a number of seconds, got NaN")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise _invalid(argument, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return seconds


def _retention(value: Any) -> timedelta:
    try:
        return to_duration(value, "retention")
    except ValueError as exc:
        raise _invalid("retention", str(exc).removeprefix("retention ")) from None


def _status(value: Any) -> RunStatus | None:
    if value is None or isinstance(value, RunStatus):
        return value
    if isinstance(value, str):
        try:
            return RunStatus(value.upper())
        except ValueError:
            pass
    allowed = ", ".join(s.value for s in RunStatus)
    raise _invalid("status", f"must be one of {allowed}, got {value!r}")


def _aware(value: Any, argument: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise _invalid(argument, f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        # Stored times are UTC-aware; a naive one cannot be compared without guessing.
        raise _invalid(argument, "must be timezone-aware (e.g. datetime.now(UTC))")
    return value


def _statuses(value: Any) -> tuple[RunStatus | None, frozenset[RunStatus]]:
    """``status`` as ``RunFilter`` takes it: one status, or several (any of them)."""
    if isinstance(value, list | tuple | set | frozenset):
        if not value:
            raise _invalid("status", "must name at least one status, got an empty collection")
        if any(item is None for item in value):
            raise _invalid("status", f"must list statuses, got None in {value!r}")
        several = frozenset(s for s in map(_status, value) if s is not None)
        if len(several) == 1:
            return next(iter(several)), frozenset()
        return None, several
    return _status(value), frozenset()


def _filter(
    *,
    status: Any,
    workflow_id: Any,
    created_after: Any,
    created_before: Any,
    attributes: Any,
    limit: int = 50,
    offset: int = 0,
    updated_after: Any = None,
    updated_before: Any = None,
) -> RunFilter:
    if workflow_id is not None:
        _non_empty(workflow_id, "workflow_id")
    attrs = dict(attributes) if isinstance(attributes, Mapping) else attributes
    if attrs is not None:
        validate_attributes(attrs, field="attributes")
    one, several = _statuses(status)
    return RunFilter(
        status=one,
        statuses=several,
        workflow_id=workflow_id,
        created_after=_aware(created_after, "created_after"),
        created_before=_aware(created_before, "created_before"),
        updated_after=_aware(updated_after, "updated_after"),
        updated_before=_aware(updated_before, "updated_before"),
        attributes=attrs or {},
        limit=_count(limit, "limit", minimum=1, maximum=10_000),
        offset=_count(offset, "offset", minimum=0, maximum=2**62),
    )


class RunHandle:
    """A started run: ``run_id``, and ``await handle.result()`` for its output.

    Holds no state beyond the id (and whether ``start`` handed the run to a worker of
    this engine, which only slows its fallback polling), so a handle made later
    (``engine.handle(run_id)``, another process) behaves the same as the one ``start``
    returned.
    """

    def __init__(
        self, engine: Engine, run_id: str, *, local: bool = False, created: bool | None = None
    ) -> None:
        self.engine = engine
        self.run_id = run_id
        self.created = created
        """From ``start`` / ``start_or_signal``: whether this call created the run
        (``False``: its idempotency key named an existing one); ``None`` otherwise."""
        self._local = local
        """The start handed the run to a worker of this engine: its end is heard here, so
        ``result`` polls only as a slow fallback (the worker may stop and another process
        finish the run)."""

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r})"

    async def get(self) -> Run:
        """The run as stored now, with its stages."""
        return await self.engine.get_run(self.run_id)

    async def cancel(self, reason: str | None = None) -> bool:
        return await self.engine.cancel(self.run_id, reason=reason)

    async def result(self, timeout: float | timedelta | None = None) -> Any:  # noqa: ASYNC109 - binding API name (DESIGN §3.3)
        """Wait until the run is terminal: its output if COMPLETED, ``RunFailedError``
        or ``RunCancelledError`` otherwise, ``TimeoutError`` once ``timeout`` seconds
        pass first (the run keeps going). A cancelled run whose saga compensations are
        still running is not finished yet: the error comes once they are, and names
        their outcome.

        Wakes when the run ends: at once when it ends in this process (the storage
        adapter tells the engine after the commit), through ``LISTEN/NOTIFY`` on
        PostgreSQL when another process ends it. A run ``start`` handed to this engine's
        worker costs no read at all: the commit that ends it brings its outcome
        (``RunWaiters.expect``). Polling storage with a capped backoff (5 ms doubling to
        1 s) is the fallback, so it works whichever process or worker executes the run.

        A run that continued as new (``ctx.continue_as_new``) is followed: the answer is
        the outcome of the last run of its chain, whichever run this handle names.
        """
        run_id = self.run_id
        limit = None if timeout is None else _seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        delay = _RESULT_MAX_POLL if self._local else _RESULT_FIRST_POLL
        waiters = self.engine.run_waiters
        while True:
            # Registered before the read, so an end committed in between still wakes us.
            watched = run_id
            woken = waiters.waiter(watched)
            try:
                # A run started here for a worker here brings its outcome when it ends
                # (no read); until then there is nothing to read for.
                run = waiters.outcome(run_id)
                if run is None and not waiters.expecting(run_id):
                    await waiters.before_read(run_id)  # PostgreSQL: ask for its end's NOTIFY
                    run = await self.engine.get_run(run_id, with_stages=False)
                compensating = False
                if run is not None:
                    if run.status is RunStatus.COMPLETED and run.continued_as is not None:
                        run_id = run.continued_as  # its chain goes on: wait for that run
                        delay = _RESULT_FIRST_POLL
                        continue
                    if run.status is RunStatus.COMPLETED:
                        if type(run.output) is MissingPayload:  # offloaded, its blob gone
                            raise run.output.error()
                        return run.output
                    if run.status is RunStatus.FAILED:
                        raise RunFailedError(run.id, run.error)
                    if run.status is RunStatus.CANCELLED:
                        # A cancelled code workflow with a saga is CANCELLED at once, but
                        # its compensations still run: answer once they have, with their
                        # outcome.
                        run = await self.engine.get_run(run_id)
                        compensating = any(not stage.status.terminal for stage in run.stages)
                        if not compensating:
                            raise RunCancelledError(run.id, run.error)
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        if run is None:  # read once more: the state for the message
                            waiters.forget_expected(run_id)
                            continue
                        state = "CANCELLED and compensating" if compensating else run.status.value
                        raise TimeoutError(f"run {run.id!r} is still {state} after {limit:g}s")
                    delay = min(delay, remaining)
                await asyncio.wait([woken], timeout=delay)
                if not woken.done():  # the fallback poll reads, whoever ends the run
                    waiters.forget_expected(run_id)
            finally:
                waiters.forget(watched, woken)
            delay = min(delay * 2, _RESULT_MAX_POLL)


class Engine:
    """The application's entry point: ``await Engine.open(url, workflows=[...])``.

    Construct directly from a kernel (``Engine(kernel)``) to put the facade over ports
    wired by hand; ``Engine.open`` builds the ports from a URL and owns them.
    """

    def __init__(self, kernel: Kernel, backend: Backend | None = None) -> None:
        self.kernel = kernel
        self.backend = backend
        self._workers: weakref.WeakSet[Worker] = weakref.WeakSet()
        self._closed = False
        self.schedules: Schedules = Schedules(
            kernel.dispatch,
            kernel.deps.persistence,
            on_due=functools.partial(_note_fire_time, self._workers),
        )
        """Cron schedules: ``create``, ``update``, ``pause``, ``resume``, ``delete``,
        ``trigger``, ``get``, ``list`` (docs/schedules.md)."""
        self.outbox = OutboxView(kernel, self._check_open)
        """The outbox beyond one run: ``dead_letters``, ``replay_dead_letters`` (the DLQ),
        ``feed`` and ``last_id`` (the all-runs event feed; ``runtime/outbox_view.py``)."""
        self.run_waiters = RunWaiters(
            kernel.deps.persistence, backend.wake_source if backend is not None else None
        )
        """Where ``RunHandle.result`` waits for its run to end (see ``runtime.run_waiters``)."""
        self._unwatch_ends: Callable[[], None] | None = None
        telemetry = kernel.deps.telemetry
        watch = getattr(kernel.deps.persistence, "watch_run_ends", None)
        if telemetry is not None and watch is not None:  # runs ended by this process, counted
            self._unwatch_ends = watch(telemetry.runs_ended)

    @classmethod
    async def open(
        cls,
        url: str,
        workflows: Iterable[WorkflowDefinition] = (),
        *,
        auto_migrate: bool = False,
        blobs: str | os.PathLike[str] | BlobStore | None = None,
        blob_root: str | os.PathLike[str] | None = None,
        clock: Clock | None = None,
        event_sink: EventSink | None = None,
        ids: IdGenerator | None = None,
        plugins: Iterable[KernelPlugin] = (),
        settings: KernelSettings | None = None,
        logger: Any = None,
        payload_max_bytes: int | None = DEFAULT_PAYLOAD_MAX_BYTES,
        schedules: Iterable[ScheduleDefinition] = (),
        retention: timedelta | float | None = None,
        telemetry: Telemetry | bool | None = None,
        ai_recording: AIRecording | None = None,
        **engine_options: Any,
    ) -> Engine:
        """Open the backend ``url`` names (``memory://``, ``sqlite:///file.db``,
        ``postgresql+psycopg://...``) and register ``workflows``.

        A SQLite file is created and migrated; a PostgreSQL schema must already be at
        head (``treadle migrate``) unless ``auto_migrate=True``. JSON payloads larger
        than ``payload_max_bytes`` are kept in the blob store, the row holding a
        reference (``None``: always inline); see docs/storage.md. ``blobs`` is where
        blobs go: a ``BlobStore``, ``s3://bucket/prefix`` or a directory (default
        ``$TREADLE_BLOBS_URL``, else beside the SQLite file, in PostgreSQL, or in memory);
        ``event_sink`` where events are published (default: the webhook
        ``$TREADLE_WEBHOOK_URL`` names, else the log). The cron schedules
        the workflows declare (``@workflow(schedule=...)``) and ``schedules``
        (``define_schedule(...)``) are created, or brought in line with the code.
        ``retention`` (a number means seconds) is how long terminal runs of workflows
        without their own are kept before the maintenance tick purges them
        (docs/lifecycle.md; default: forever). ``ai_recording`` says what of each AI
        call is stored (``AIRecording(record_prompts=False)``, a ``redact`` callable;
        docs/ai.md). ``telemetry=True`` traces and measures the work on OpenTelemetry's
        global providers (the ``otel`` extra; or pass an ``OtelTelemetry`` to choose the
        providers); off by default, and then no OpenTelemetry code runs at all
        (docs/observability.md).
        """
        _non_empty(url, "url")
        tel = _telemetry(telemetry)
        if retention is not None:
            settings = dataclasses.replace(
                settings or KernelSettings(), default_retention=_retention(retention)
            )
        definitions = _definitions(workflows)
        backend = await open_backend(
            url,
            blobs=blobs,
            blob_root=blob_root,
            auto_migrate=auto_migrate,
            clock=clock,
            event_sink=event_sink,
            payload_max_bytes=payload_max_bytes,
            **engine_options,
        )
        try:
            if logger is None:
                from treadle.adapters.logging import structlog_logger

                logger = structlog_logger()
            kernel = backend.kernel(
                definitions,
                ids=ids,
                plugins=plugins,
                settings=settings,
                logger=logger,
                telemetry=tel,
                ai=ai_recording,
            )
            declared = [*declared_schedules(definitions), *schedules]
            if declared:
                await kernel.schedules.sync(declared)
        except BaseException:
            await backend.aclose()
            raise
        return cls(kernel, backend)

    # -- lifecycle ----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop in-process workers (draining their jobs), drop the code-workflow bodies
        the kernel keeps parked (``Kernel.close``) and release the backend. Idempotent;
        an ``Engine(kernel)`` built by hand leaves the ports to its caller. Leaving
        ``async with engine:`` calls it."""
        if self._closed:
            return
        self._closed = True
        if self._unwatch_ends is not None:
            self._unwatch_ends()
        workers = builtins.list(self._workers)
        await asyncio.gather(*(w.aclose() for w in workers))
        await self.run_waiters.aclose()
        self.kernel.close()
        if self.backend is not None:
            await self.backend.aclose()

    async def close(self) -> None:
        """``aclose()`` under the name DESIGN.md §3.3 gives it; kept as an alias: every
        other closable object in Treadle says ``aclose``."""
        await self.aclose()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise TreadleError("this Engine is closed")

    def worker(
        self, options: WorkerOptions | Mapping[str, Any] | None = None, /, **overrides: Any
    ) -> Worker:
        """An in-process ``Worker`` on this engine's kernel, for small apps and tests:
        ``async with engine.worker(concurrency=4): ...``. Runs started through this
        engine wake it at once. ``options`` (a ``WorkerOptions``) and ``overrides`` are
        the worker's options (``worker_id``, ``concurrency``, ``orchestration_interval``,
        ``job_poll_interval``, ``stale_lease_threshold``, ``queues``: the named queues
        it serves, ``("default",)`` unless given, ...), checked once by
        ``WorkerOptions``; ``logger``, ``wake_source`` and ``registry`` may be given too.
        """
        self._check_open()
        extra = {
            k: overrides.pop(k) for k in ("logger", "wake_source", "registry") if k in overrides
        }
        if self.backend is not None and self.backend.wake_source is not None:
            # PostgreSQL: LISTEN/NOTIFY wakes it for jobs enqueued by other processes too.
            extra.setdefault("wake_source", self.backend.wake_source)
        if self.backend is not None and self.backend.workers is not None:
            extra.setdefault("registry", self.backend.workers)
        worker = Worker(self.kernel, WorkerOptions.build(options, overrides), **extra)
        self._workers.add(worker)
        return worker

    def _notify(self) -> None:
        for worker in builtins.list(self._workers):
            if worker.running:
                worker.notify()

    # -- starting and steering runs -------------------------------------------------------
    async def start(
        self,
        workflow_id: str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        priority: int = 5,
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        search_attributes: Mapping[str, Any] | None = None,
        execution_timeout: timedelta | float | None = None,
        concurrency_key: str | None = None,
        max_cost: Decimal | float | str | None = None,
    ) -> RunHandle:
        """Create a run (PENDING); a worker claims it. With ``idempotency_key``, starting
        again returns the first run instead of creating another. Invalid input or config
        raises a ``TreadleValidationError`` naming the field, and nothing is written.
        ``execution_timeout`` (code workflows) caps this run's wall-clock time from its
        start, overriding the workflow's. ``concurrency_key`` groups runs under the
        workflow's per-key concurrency and rate limits (docs/flow-control.md). ``max_cost``
        is the run's AI budget, overriding the workflow's (docs/ai.md)."""
        self._check_open()
        command = arguments.start_command(
            "Engine",
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
            return (await self._start(command))[0]
        started = await start_traced(
            telemetry, command, self._start, lambda hc: (hc[0].run_id, hc[1])
        )
        return started[0]

    async def _start(self, command: c.RunCreate) -> tuple[RunHandle, bool]:
        """``start``'s command dispatched: the handle, and whether a run was created."""
        loan = self._lend_slot()
        if loan is None:
            result = await self.kernel.dispatch(command)
            self._notify()
            return RunHandle(self, result.workflow_run_id, created=result.created), result.created
        # A worker of this engine has a free slot: the run is claimed for it in the start's
        # own commit and its first stage runs there at once (no claim, no wake-up).
        job = None
        try:
            result = await self.kernel.dispatch(
                command.model_copy(update={"claim_for": loan.worker_id})
            )
            job = result.chained_job
            if job is not None:  # before its first stage can run: no end is missed
                self.run_waiters.expect(result.workflow_run_id)
        finally:
            loan.settle(job)
        if job is None:
            self._notify()  # not claimed here (an existing run, a stopping worker)
        return (
            RunHandle(self, result.workflow_run_id, local=job is not None, created=result.created),
            result.created,
        )

    def _lend_slot(self) -> SlotLoan | None:
        for worker in builtins.list(self._workers):
            loan = worker.lend_slot()
            if loan is not None:
                return loan
        return None

    async def start_many(
        self,
        items: Iterable[Mapping[str, Any] | StartItem],
        *,
        batch_size: int = START_MANY_BATCH,
    ) -> builtins.list[RunHandle]:
        """Start many runs: one handle per item, in order. Each item is a mapping (or a
        ``StartItem``) with ``workflow_id`` and ``input``, and optionally
        ``idempotency_key``, ``priority``, ``config``, ``run_id``, ``search_attributes``,
        as ``start`` takes them.

        Items go ``batch_size`` at a time (at most 10,000) to the kernel's
        ``run.createMany``: one transaction and a fixed number of statements per batch,
        whatever its size, and one wake-up of the workers. An item whose idempotency key
        names an existing run, or an earlier item, gets that run's handle and creates
        nothing. Every item is validated before the first batch is written: a bad one
        raises the error ``start`` would (a ``TreadleValidationError``, or
        ``WorkflowNotFoundError``), naming it (``items[3].input.name: ...``), and nothing
        is written. A batch is atomic; a later batch failing (the database, a
        duplicate ``run_id``) leaves the earlier ones started, and retrying the call with
        idempotency keys starts only what is missing."""
        self._check_open()
        size = _count(batch_size, "batch_size", minimum=1, maximum=c.MAX_CREATE_MANY)
        parsed = arguments.start_items("Engine", items)
        if len(parsed) > size:
            # Before the first batch commits: input and config of them all (the kernel
            # checks each batch again, as it checks every command).
            validate_items(self.kernel.deps, parsed)
        telemetry = self.kernel.deps.telemetry
        if telemetry is None or not parsed:
            return (await self._start_many(parsed, size))[0]
        workflows = sorted({item.workflow_id for item in parsed})
        with telemetry.starting(",".join(workflows), len(parsed)) as span:
            if span.trace_context is not None:
                parsed = [
                    item.model_copy(update={"trace_context": span.trace_context}) for item in parsed
                ]
            handles, created = await self._start_many(parsed, size)
            for item, handle, new in zip(parsed, handles, created, strict=True):
                span.started(handle.run_id, item.workflow_id, new)
        return handles

    async def _start_many(
        self, parsed: builtins.list[c.RunCreateItem], size: int
    ) -> tuple[builtins.list[RunHandle], builtins.list[bool]]:
        """``start_many``'s batches dispatched: the handles, and which runs are new."""
        handles: builtins.list[RunHandle] = []
        created: builtins.list[bool] = []
        for offset in range(0, len(parsed), size):
            batch = parsed[offset : offset + size]
            try:
                result = await self.kernel.dispatch(c.RunCreateMany(items=batch))
            except TreadleError as exc:
                if offset:
                    exc.add_note(
                        f"Engine.start_many: in the batch of items[{offset}] to "
                        f"items[{offset + len(batch) - 1}] (its indices count from its first "
                        f"item); items[0] to items[{offset - 1}] were started"
                    )
                raise
            self._notify()
            handles.extend(RunHandle(self, run.workflow_run_id) for run in result.runs)
            created.extend(run.created for run in result.runs)
        return handles, created

    async def start_or_signal(
        self,
        workflow_id: str,
        input: Any,
        signal: str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        priority: int = 5,
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        search_attributes: Mapping[str, Any] | None = None,
    ) -> RunHandle:
        """Signal-with-start: deliver ``signal`` to the run with this idempotency key,
        starting it first if there is none (code workflows; pipelines refuse it)."""
        self._check_open()
        command = _build(
            c.RunCreate,
            "start_or_signal",
            workflow_id=_non_empty(workflow_id, "workflow_id"),
            input=input,
            idempotency_key=idempotency_key,
            priority=_count(priority, "priority", minimum=0, maximum=100),
            config=_mapping(config, "config"),
            run_id=run_id,
            search_attributes=_mapping(search_attributes, "search_attributes"),
            signal=c.SignalSpec(name=_non_empty(signal, "signal"), payload=payload),
        )
        telemetry = self.kernel.deps.telemetry
        if telemetry is None:
            result = await self.kernel.dispatch(command)
        else:
            result = await start_traced(telemetry, command, self.kernel.dispatch, _run_created)
        self._notify()
        return RunHandle(self, result.workflow_run_id, created=result.created)

    def handle(self, run_id: str) -> RunHandle:
        """A handle for an existing run (checked when used, not here)."""
        return RunHandle(self, _non_empty(run_id, "run_id"))

    async def cancel(self, run_id: str, reason: str | None = None) -> bool:
        """Cancel the run now; ``False`` if it had already finished."""
        self._check_open()
        command = _build(c.RunCancel, "cancel", workflow_run_id=run_id, reason=reason)
        return (await self.kernel.dispatch(command)).cancelled

    async def pause(self, run_id: str, reason: str | None = None) -> bool:
        """Start no new stage or step of the run until ``resume``; the one in flight
        finishes. ``False`` if it was paused already; ``InvalidStateError`` naming the run
        and its status if it has ended (docs/lifecycle.md)."""
        self._check_open()
        command = _build(c.RunPause, "pause", workflow_run_id=run_id, reason=reason)
        return (await self.kernel.dispatch(command)).paused

    async def resume(self, run_id: str, reason: str | None = None) -> bool:
        """Go on with a paused run from where it stopped; ``False`` if it was not paused."""
        self._check_open()
        command = _build(c.RunResume, "resume", workflow_run_id=run_id, reason=reason)
        result = (await self.kernel.dispatch(command)).resumed
        if result:
            self._notify()  # its held jobs are queued again: wake the in-process worker
        return result

    async def terminate(self, run_id: str, reason: str | None = None) -> bool:
        """End the run at once (CANCELLED) without running its saga compensations, unlike
        ``cancel``; ``False`` if it had already finished."""
        self._check_open()
        command = _build(c.RunTerminate, "terminate", workflow_run_id=run_id, reason=reason)
        return (await self.kernel.dispatch(command)).terminated

    async def purge(
        self,
        older_than: timedelta | float | None = None,
        *,
        status: Any = None,
        workflow_id: str | None = None,
        dry_run: bool = False,
        batch_size: int = 100,
    ) -> c.RunPurgeResult:
        """Delete terminal runs that ended more than ``older_than`` ago (``None``: each
        past its workflow's ``retention`` or the engine's), with everything stored for
        them, in batches of ``batch_size`` runs; ``status`` narrows to COMPLETED, FAILED
        or CANCELLED (one or several). ``dry_run`` deletes nothing and reports the first
        ``MAX_PURGE_BATCH`` runs it would. Returns the totals of every batch."""
        self._check_open()
        one, several = _statuses(status) if status is not None else (None, frozenset())
        statuses = sorted({one} if one is not None else several) or None
        size = c.MAX_PURGE_BATCH if dry_run else batch_size
        ids: builtins.list[str] = []
        blobs = 0
        while True:
            command = _build(
                c.RunPurge,
                "purge",
                older_than=older_than,
                statuses=statuses,
                workflow_id=workflow_id,
                dry_run=dry_run,
                max_runs=size,
            )
            result = await self.kernel.dispatch(command)
            ids.extend(result.workflow_run_ids)
            blobs += result.blobs_deleted
            if dry_run or not result.more or not result.workflow_run_ids:
                return c.RunPurgeResult(
                    purged=len(ids),
                    workflow_run_ids=ids,
                    blobs_deleted=blobs,
                    more=result.more,
                    dry_run=dry_run,
                )

    async def rerun_from(
        self, run_id: str, stage_id: str, *, config: Mapping[str, Any] | None = None
    ) -> c.RunRerunFromResult:
        """Reset ``stage_id`` and every later stage of a finished run and run them again;
        the result lists the reset stages. ``await engine.handle(run_id).result()``
        waits for the new outcome. ``config`` (``{stage_id: {...}}``) replaces the config
        of reset stages, validated like ``start``'s, so a run that failed on a bad config
        can be fixed and re-run; naming a stage the rerun keeps is an
        ``InvalidConfigError``."""
        self._check_open()
        command = _build(
            c.RunRerunFrom,
            "rerun_from",
            workflow_run_id=run_id,
            from_stage_id=stage_id,
            config=None if config is None else _mapping(config, "config"),
        )
        result = await self.kernel.dispatch(command)
        self._notify()
        return result

    async def fork(
        self, run_id: str, from_step: str, *, idempotency_key: str | None = None
    ) -> RunHandle:
        """A new run of a code workflow that reuses ``run_id``'s journal before step
        ``from_step`` (its first occurrence; ``"name#2"`` names the second) and runs that
        step and everything after it afresh, under the version registered now. The
        code-workflow counterpart of ``rerun_from``: the source run is left as it is.
        Unknown run: ``RunNotFoundError``; a pipeline run: ``NotSupportedError``; a step
        its journal does not hold: ``StepNotFoundError``. Nothing is written then. With
        ``idempotency_key``, forking again returns the first fork instead of another."""
        self._check_open()
        if idempotency_key is not None:
            _non_empty(idempotency_key, "idempotency_key")
        result = await self.kernel.fork(
            _non_empty(run_id, "run_id"),
            _non_empty(from_step, "from_step"),
            idempotency_key=idempotency_key,
        )
        self._notify()
        return RunHandle(self, result.workflow_run_id)

    async def signal(
        self, run_id: str, name: str, payload: Any = None, *, idempotency_key: str | None = None
    ) -> bool:
        """Deliver a signal to a waiting code workflow; ``True`` once it is in the inbox."""
        self._check_open()
        command = _build(
            c.RunSignal,
            "signal",
            workflow_run_id=run_id,
            name=name,
            payload=payload,
            idempotency_key=idempotency_key,
        )
        result = await self.kernel.dispatch(command)
        self._notify()
        return result.delivered

    async def update(
        self,
        run_id: str,
        name: str,
        payload: Any = None,
        *,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109 - binding API name (issue 5)
        idempotency_key: str | None = None,
    ) -> JsonValue:
        """Send an update to a code workflow and return the reply its body gives through
        ``wait_for_update(...).reply(value)``. ``TimeoutError`` once ``timeout`` seconds
        pass first (the update stays delivered); ``InvalidStateError`` if the run ends
        without answering. Retrying with the same ``idempotency_key`` never sends twice."""
        self._check_open()
        limit = None if timeout is None else _seconds(timeout, "timeout")
        command = _build(
            c.RunUpdate,
            "update",
            workflow_run_id=run_id,
            name=name,
            payload=payload,
            idempotency_key=idempotency_key,
        )
        result = await self.kernel.dispatch(command)
        self._notify()
        deadline = None if limit is None else time.monotonic() + limit
        delay = _RESULT_FIRST_POLL
        while True:
            answered, reply = await self.kernel.reads.update_reply(run_id, result.update_id)
            if answered:
                return reply
            run = await self.kernel.reads.get_run(run_id, with_stages=False)
            while run.continued_as is not None:  # forwarded along its chain: the newest
                run = await self.kernel.reads.get_run(run.continued_as, with_stages=False)
            if run.status.terminal:
                # The reply commits before the run ends: re-read it once the run has ended.
                answered, reply = await self.kernel.reads.update_reply(run_id, result.update_id)
                if answered:
                    return reply
                raise InvalidStateError(
                    f"run {run_id!r} ended {run.status.value} without answering update {name!r}"
                )
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"update {name!r} of run {run_id!r} unanswered after {limit:g}s"
                    )
                delay = min(delay, remaining)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESULT_MAX_POLL)

    async def decide_review(
        self,
        run_id: str,
        review_id: str,
        decision: Literal["approved", "rejected"],
        *,
        reviewer: str | None = None,
        comment: str | None = None,
        idempotency_key: str | None = None,
    ) -> bool:
        """Record a reviewer's decision (``"approved"`` / ``"rejected"``) and wake the run."""
        self._check_open()
        command = _build(
            c.ReviewDecide,
            "decide_review",
            workflow_run_id=run_id,
            review_id=review_id,
            decision=decision,
            reviewer=reviewer,
            comment=comment,
            idempotency_key=idempotency_key,
        )
        result = await self.kernel.dispatch(command)
        self._notify()
        return result.recorded

    async def query(self, run_id: str, name: str) -> JsonValue:
        """Read state a code workflow published with ``ctx.publish(name, value)``: the
        latest value, or ``None`` before its first publish. Read-only: the run is never
        woken. Stage pipelines publish no state (``NotSupportedError``)."""
        self._check_open()
        _non_empty(name, "name")
        return await self.kernel.reads.query(_non_empty(run_id, "run_id"), name)

    async def journal(self, run_id: str) -> builtins.list[JournalEntry]:
        """A code workflow run's journal: each durable ``ctx`` call in the order the body
        reached it, with its status, attempts and recorded result."""
        self._check_open()
        return await self.kernel.reads.journal(_non_empty(run_id, "run_id"))

    async def annotate(
        self,
        run_id: str,
        attributes: Mapping[str, JsonValue],
        *,
        actor: str | None = None,
        scope: str | None = None,
        idempotency_key: str | None = None,
    ) -> Annotation:
        """Attach a provenance record; its attributes become search attributes that
        ``list(attributes=...)`` filters on. A repeated ``idempotency_key`` is a no-op."""
        self._check_open()
        _non_empty(run_id, "run_id")
        return await self.kernel.annotations.attach(
            run_id, attributes, actor=actor, scope=scope, idempotency_key=idempotency_key
        )

    # -- reading ------------------------------------------------------------------------
    async def get_run(self, run_id: str, *, with_stages: bool = True) -> Run:
        """The run with its stages; ``RunNotFoundError`` if there is none."""
        self._check_open()
        return await self.kernel.reads.get_run(
            _non_empty(run_id, "run_id"), with_stages=with_stages
        )

    async def list(
        self,
        status: str | RunStatus | Iterable[str | RunStatus] | None = None,
        workflow_id: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        attributes: Mapping[str, JsonValue] | None = None,
        limit: int = 50,
        offset: int = 0,
        *,
        parent_run_id: str | None = None,
        paused: bool | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
        after: Run | tuple[datetime, str] | None = None,
        payloads: bool = True,
    ) -> builtins.list[Run]:
        """Runs matching every given filter, newest first (without stages).
        ``status`` is one status or a list of them (any one matches);
        ``created_after`` and ``updated_after`` are inclusive, ``created_before`` and
        ``updated_before`` exclusive; ``parent_run_id`` selects the children a code
        workflow started with ``ctx.child``; ``paused=True`` the runs ``pause`` holds
        (``False``: the others). ``after`` pages by key instead of ``offset``: pass the
        last run of the previous page (or its ``(created_at, id)``) to get the runs
        that follow it, which stays fast and skips nothing however deep the page.
        ``payloads=False`` leaves ``input`` and ``output`` out (``None``): what a listing
        needs, without fetching offloaded payloads from the blob store."""
        self._check_open()
        query = _filter(
            status=status,
            workflow_id=workflow_id,
            created_after=created_after,
            created_before=created_before,
            attributes=attributes,
            limit=limit,
            offset=offset,
            updated_after=updated_after,
            updated_before=updated_before,
        )
        if after is not None:
            query = query.model_copy(update={"after": _after(after)})
        if payloads is not True:
            if payloads is not False:
                raise _invalid("payloads", f"must be True or False, got {payloads!r}")
            query = query.model_copy(update={"payloads": False})
        if parent_run_id is not None:
            query = query.model_copy(
                update={"parent_run_id": _non_empty(parent_run_id, "parent_run_id")}
            )
        if paused is not None:
            if not isinstance(paused, bool):
                raise _invalid("paused", f"must be True, False or None, got {paused!r}")
            query = query.model_copy(update={"paused": paused})
        return await self.kernel.reads.list_runs(query)

    async def ai_calls(self, run_id: str, *, limit: int = 1000) -> builtins.list[AICall]:
        """The run's recorded AI calls in recording order, prompts and responses included
        (unless the engine's ``ai_recording`` dropped them); ``RunNotFoundError`` if no
        such run. Failed attempts' calls are there too, ``failed_attempt=True``."""
        self._check_open()
        return await self.kernel.reads.ai_calls(
            _non_empty(run_id, "run_id"), limit=_count(limit, "limit", minimum=1, maximum=100_000)
        )

    async def ai_costs(
        self,
        by: Literal["workflow", "model", "day", "run"] = "model",
        *,
        since: datetime | timedelta | float | None = None,
        until: datetime | None = None,
        workflow_id: str | None = None,
        limit: int = 1000,
    ) -> builtins.list[AICostRow]:
        """What AI calls cost, grouped ``by`` workflow, model, UTC day or run, most
        expensive first: calls, failed calls, tokens and cost per group. ``since`` is a
        moment or a look-back (``timedelta(days=7)``, a number of seconds) from now."""
        self._check_open()
        if by not in ("workflow", "model", "day", "run"):
            raise _invalid("by", f"must be 'workflow', 'model', 'day' or 'run', got {by!r}")
        start: datetime | None
        if since is None or isinstance(since, datetime):
            start = since
        else:
            try:
                start = self.kernel.deps.clock.now() - to_duration(since, "since")
            except ValueError as exc:
                raise _invalid("since", str(exc)) from None
        return await self.kernel.reads.ai_costs(
            by,
            since=start,
            until=until,
            workflow_id=workflow_id,
            limit=_count(limit, "limit", minimum=1, maximum=100_000),
        )

    async def aggregate(
        self,
        by: Literal["status", "workflow_id"] = "status",
        *,
        status: str | RunStatus | Iterable[str | RunStatus] | None = None,
        workflow_id: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        attributes: Mapping[str, JsonValue] | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
    ) -> dict[str, int]:
        """Run counts per status or per workflow id over the filtered runs (the filters
        of ``list``); groups with no runs are absent."""
        self._check_open()
        if by not in ("status", "workflow_id"):
            raise _invalid("by", f"must be 'status' or 'workflow_id', got {by!r}")
        query = _filter(
            status=status,
            workflow_id=workflow_id,
            created_after=created_after,
            created_before=created_before,
            attributes=attributes,
            updated_after=updated_after,
            updated_before=updated_before,
        )
        async with self.kernel.deps.persistence.transaction() as tx:
            counts = await tx.runs.count(by, query)
        return dict(sorted(counts.items()))

    async def queues(self, *, live_within: timedelta | float = 60.0) -> builtins.list[QueueInfo]:
        """Every named queue with jobs, a live worker or a registered workflow routing to
        it, by name: its due, scheduled and leased jobs, the workers that serve it (those
        that beat within ``live_within``; a worker beats on every full tick, by default
        every 10 s) and ``unserved`` when jobs wait and no live worker serves it."""
        self._check_open()
        registry = self.backend.workers if self.backend is not None else None
        if registry is None:
            raise NotSupportedError("this engine has no worker registry (open it from a URL)")
        window = arguments.duration(live_within, "live_within")
        now = self.kernel.deps.clock.now()
        depths = {depth.queue: depth for depth in await registry.queue_depths(now)}
        live = [w for w in await registry.list_workers() if w.heartbeat_at >= now - window]
        declared = {queue for wf in _registered(self.kernel.deps.registry) for queue in wf.queues}
        names = sorted({*depths, *declared, *(q for w in live for q in w.queues)})
        return [
            QueueInfo(
                **(depths[name].model_dump() if name in depths else {"queue": name}),
                workers=tuple(w.worker_id for w in live if name in w.queues),
                declared=name in declared,
            )
            for name in names
        ]

    async def events(
        self,
        run_id: str,
        *,
        follow: bool = False,
        poll_interval: float | timedelta = 0.5,
        after_sequence: int = 0,
    ) -> AsyncIterator[EventBase]:
        """The run's events in sequence order, as typed models.

        With ``follow=True`` keep tailing until the run is terminal and every event it
        recorded has been yielded. Reads the outbox, so events appear as soon as they
        commit, whether or not they have been published to the sink yet.
        """
        self._check_open()
        interval = _seconds(poll_interval, "poll_interval", allow_zero=False)
        seen = _count(after_sequence, "after_sequence", minimum=0, maximum=2**62)
        await self.get_run(run_id, with_stages=False)  # RunNotFoundError before iterating
        while True:
            # Status first: a terminal status read before the events guarantees that the
            # read below sees every event committed up to and with that status.
            run = await self.kernel.reads.get_run(run_id, with_stages=False) if follow else None
            for event in await self.kernel.reads.events(run_id, seen):
                seen = max(seen, event.sequence)
                yield event
            if run is None or run.status.terminal:
                return
            await asyncio.sleep(interval)

    async def annotations(
        self,
        run_id: str,
        *,
        key: str | None = None,
        key_prefix: str | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> builtins.list[Annotation]:
        self._check_open()
        return await self.kernel.annotations.list(
            _non_empty(run_id, "run_id"), key=key, key_prefix=key_prefix, scope=scope, limit=limit
        )

    async def timers(self, run_id: str) -> builtins.list[Timer]:
        """A code workflow run's timers that have not fired (sleeps, signal timeouts,
        retry back-offs), soonest first; ``RunNotFoundError`` if there is no such run."""
        self._check_open()
        await self.get_run(run_id, with_stages=False)
        async with self.kernel.deps.persistence.transaction() as tx:
            timers = await tx.timers.pending(run_id)
        return sorted(timers, key=lambda timer: timer.fire_at)

    def workflows(self) -> builtins.list[WorkflowDefinition]:
        """The workflow definitions this engine has registered, by id then version."""
        return sorted(
            _registered(self.kernel.deps.registry), key=lambda wf: (wf.id, str(wf.version))
        )

    async def logs(self, run_id: str) -> builtins.list[LogRecord]:
        """Log lines stages wrote with ``ctx.log``, in order."""
        self._check_open()
        async with self.kernel.deps.persistence.transaction() as tx:
            return await tx.logs.for_run(_non_empty(run_id, "run_id"))


def _after(value: Any) -> tuple[datetime, str]:
    """``Engine.list(after=...)``: a ``Run``, or its ``(created_at, id)``."""
    if isinstance(value, Run):
        return value.created_at, value.id
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        when = _aware(value[0], "after")
        if when is not None and value[1]:
            return when, value[1]
    raise _invalid("after", f"must be a Run or a (created_at, run_id) pair, got {value!r}")


def _registered(registry: Any) -> builtins.list[WorkflowDefinition]:
    """The definitions a registry holds, when it can list them (``Registry`` can; a
    hand-written registry with only ``get_workflow`` lists none)."""
    if not isinstance(registry, Iterable):
        return []
    return [wf for wf in registry if isinstance(wf, WorkflowDefinition)]


def _definitions(workflows: Any) -> builtins.list[WorkflowDefinition]:
    if isinstance(workflows, WorkflowDefinition):
        workflows = [workflows]
    if not isinstance(workflows, Iterable) or isinstance(workflows, str | bytes | Mapping):
        raise _invalid("workflows", f"must be a list of workflow definitions, got {workflows!r}")
    out = builtins.list(workflows)
    for index, wf in enumerate(out):
        if not isinstance(wf, WorkflowDefinition):
            raise _invalid(
                f"workflows[{index}]",
                f"must be a built workflow (WorkflowBuilder(...).build()), got {wf!r}",
            )
    return out


def _run_created(result: c.RunCreateResult) -> tuple[str, bool]:
    return result.workflow_run_id, result.created


def _telemetry(telemetry: Telemetry | bool | None) -> Telemetry | None:
    """``Engine.open``'s ``telemetry``: ``True`` builds an ``OtelTelemetry`` on the global
    providers (imported only then: the ``otel`` extra may be absent)."""
    if telemetry is None or telemetry is False:
        return None
    if telemetry is True:
        try:
            from treadle.adapters.otel import OtelTelemetry
        except ImportError as exc:
            raise NotSupportedError(
                "telemetry=True needs the otel extra: pip install 'treadle[otel]'"
            ) from exc
        return OtelTelemetry()
    return telemetry


def _note_fire_time(workers: Iterable[Worker], when: datetime) -> None:
    """A schedule changed by this engine fires next at ``when``: its workers sleep until
    then (on memory nothing else would tell them before their next tick)."""
    for worker in builtins.list(workers):
        if worker.running:
            worker.note_due(when, "schedule")
