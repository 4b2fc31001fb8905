"""The worker process host: ``main(...)`` runs a ``Worker`` until SIGTERM or SIGINT.

``treadle worker`` calls ``main``; so can a ``python -m`` entry point or a test.
Everything a long-running process needs beyond the shared ``runtime.Worker`` lives
here, and only here, because it is process-wide state a library must not touch:

- logging: a stderr handler on the ``treadle`` logger (level from
  ``TREADLE_LOG_LEVEL``, default ``INFO``), installed by ``main`` and removed when it
  returns, never at import;
- the event loop and its default executor: sync stages run in a ``StageThreadPool``
  of ``concurrency`` daemon threads (plus a few for blob I/O), so a sync stage that
  outlives the drain cannot keep the process alive;
- signals: the first SIGTERM/SIGINT drains (no new claims; in-flight stages get
  ``drain_timeout`` seconds, then their jobs are released for another worker), a
  second one cuts the drain short and exits at once.

Exit codes: ``0`` after a drain (released jobs included: releasing is the designed
outcome of a drain that ran out of time); ``1`` when the backend cannot be opened
(unreachable, schema not at head); ``2`` for a bad ``app`` or option; ``128 + signum``
when a second signal forced the exit (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from treadle.adapters.logging import log_format, structlog_logger
from treadle.adapters.otel_env import tracing_asked
from treadle.adapters.urls import redact_url, scrub
from treadle.hosts.app import load_workflows
from treadle.hosts.probes import ProbeServer, Route, healthz_route, metrics_route, readyz_route
from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import TreadleError, describe_exception
from treadle.kernel.schedule_client import declared_schedules
from treadle.runtime.backends import open_backend
from treadle.runtime.options import MAX_SECONDS, WorkerOptions
from treadle.runtime.threads import StageThreadPool
from treadle.runtime.worker import Worker

__all__ = [
    "EXIT_BAD_CONFIG",
    "EXIT_OK",
    "EXIT_STARTUP_FAILED",
    "MAX_SECONDS",
    "WorkerHost",
    "main",
]

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_BAD_CONFIG = 2

FORCED_EXIT_GRACE = 2.0
"""Seconds a forced exit (second signal) spends releasing cancelled jobs and closing the
backend before giving up; whatever is left is recovered by lease expiry."""

EXTRA_THREADS = 4
"""Threads beyond ``concurrency`` in the stage pool, for blob-store file I/O and the
schema check, which share the loop's default executor with sync stages."""

_LOG_LEVEL_ENV = "TREADLE_LOG_LEVEL"


def main(
    *,
    app: str | None,
    db: str,
    options: WorkerOptions | Mapping[str, Any] | None = None,
    metrics_port: int | None = None,
    health_port: int | None = None,
    **overrides: Any,
) -> int:
    """Run a worker on ``db`` for the workflows ``app`` names until signalled; returns
    the process exit code (see the module docstring). Blocks; owns its event loop.
    ``metrics_port`` / ``health_port``: serve ``/metrics`` / ``/healthz`` and ``/readyz``
    (``hosts/probes.py``)."""
    restore_logging = _configure_logging()
    try:
        try:
            log_format()  # a bad TREADLE_LOG_FORMAT is a bad option, named
            workflows = load_workflows(app)
            host = WorkerHost(
                workflows,
                db=db,
                options=WorkerOptions.build(options, overrides),
                metrics_port=metrics_port,
                health_port=health_port,
            )
            host.telemetry_setup()
        except (TreadleError, ValueError) as exc:
            _error_line(exc, db)
            return EXIT_BAD_CONFIG
        return host.run()
    finally:
        restore_logging()


@dataclass
class _Signals:
    """What the signal handlers have seen; set only on the loop's thread."""

    first: asyncio.Event
    second: asyncio.Event
    signum: int = 0


class WorkerHost:
    """One worker process: backend, kernel, ``Worker`` and signal handling.

    ``run()`` blocks in a fresh event loop; ``serve()`` is the same inside a running
    loop, with ``request_stop()`` standing in for the signals (tests, embedding).
    """

    def __init__(
        self,
        workflows: list[WorkflowDefinition],
        *,
        db: str,
        options: WorkerOptions | Mapping[str, Any] | None = None,
        metrics_port: int | None = None,
        health_port: int | None = None,
        **overrides: Any,
    ) -> None:
        """``options`` and ``overrides`` (``concurrency=8``, ``drain_timeout=30``, ...): see
        ``WorkerOptions``, which refuses a bad one (a ``ValueError`` naming it).
        ``metrics_port`` / ``health_port`` (0: any free port; see ``ports_bound``): the
        endpoints of ``hosts/probes.py``."""
        self.options = opts = WorkerOptions.build(options, overrides)
        given_db: object = db
        if not isinstance(given_db, str) or not given_db:
            raise ValueError(f"db must be a database URL, got {db!r}")
        self.workflows = workflows
        self.db = db
        self.worker_id = opts.worker_id
        self.concurrency = opts.concurrency
        self.drain_timeout = opts.drain_timeout
        self.log = structlog_logger("treadle.hosts.worker", worker_id=self.worker_id)
        self.worker: Worker | None = None
        self._signals: _Signals | None = None
        for name, port in (("metrics_port", metrics_port), ("health_port", health_port)):
            given: object = port
            if given is not None and not (isinstance(given, int) and 0 <= given <= 65535):
                raise ValueError(f"{name} must be a port number (0 to 65535), got {port!r}")
        self.metrics_port = metrics_port
        self.health_port = health_port
        self.ports_bound: dict[str, int] = {}
        """``{"metrics": port, "health": port}`` once the endpoints listen."""
        self._otel: Any = None
        self._otel_ready = False

    def telemetry_setup(self) -> Any:
        """OpenTelemetry for this process, made once (``adapters/otel/setup.py``): when
        ``metrics_port`` is set or the environment asks for tracing (``TREADLE_OTEL=1``,
        an OTLP endpoint). ``None`` when neither; ``ValueError`` when it is asked for and
        the ``otel`` extra is not installed."""
        if self._otel_ready:
            return self._otel
        wanted = self.metrics_port is not None or tracing_asked()
        if wanted:
            try:
                from treadle.adapters.otel.setup import configure_from_env
            except ImportError as exc:
                raise ValueError(
                    f"metrics and tracing need the otel extra: pip install 'treadle[otel]' ({exc})"
                ) from None
            self._otel = configure_from_env(prometheus=self.metrics_port is not None)
        self._otel_ready = True
        return self._otel

    # -- entry points -------------------------------------------------------------------
    def run(self) -> int:
        """Serve in a new event loop with SIGTERM/SIGINT handlers; the exit code."""
        pool = StageThreadPool(self.concurrency + EXTRA_THREADS, join_timeout=1.0)
        with asyncio.Runner() as runner:
            runner.get_loop().set_default_executor(pool)
            return runner.run(self.serve(install_signal_handlers=True))

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """What a signal does: the first call drains, the second forces the exit. Call it
        on the loop's thread (signal handlers installed by ``run`` do)."""
        signals = self._signals
        if signals is None:
            return
        name = _signal_name(signum)
        if not signals.first.is_set():
            signals.signum = signum
            self.log.info("worker.stopping", signal=name, drain_timeout=self.drain_timeout)
            signals.first.set()
        elif not signals.second.is_set():
            signals.signum = signum
            self.log.warning("worker.forced_stop", signal=name)
            signals.second.set()

    async def serve(self, *, install_signal_handlers: bool = False) -> int:
        """Open the backend, run the worker until ``request_stop``, drain, close."""
        loop = asyncio.get_running_loop()
        self._signals = _Signals(asyncio.Event(), asyncio.Event())
        installed: list[int] = []
        if install_signal_handlers:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.request_stop, signum)
                installed.append(signum)
        try:
            return await self._serve()
        finally:
            for installed_signum in installed:
                loop.remove_signal_handler(installed_signum)

    # -- internals ----------------------------------------------------------------------
    async def _serve(self) -> int:
        assert self._signals is not None
        signals = self._signals
        try:
            backend = await open_backend(self.db)
        except TreadleError as exc:
            _error_line(exc, self.db)
            return EXIT_STARTUP_FAILED
        kernel = None
        setup = self.telemetry_setup()
        telemetry = setup.telemetry if setup is not None else None
        servers: list[Any] = []
        unwatch: Any = None
        try:
            kernel = backend.kernel(
                self.workflows,
                logger=structlog_logger("treadle", worker_id=self.worker_id),
                telemetry=telemetry,
            )
            watch = getattr(backend.persistence, "watch_run_ends", None)
            if telemetry is not None and watch is not None:
                unwatch = watch(telemetry.runs_ended)
            declared = declared_schedules(self.workflows)
            if declared:  # @workflow(schedule=...): created, or kept in step with the code
                await kernel.schedules.sync(declared)
            options: dict[str, Any] = {}
            wake_source = getattr(backend, "wake_source", None)
            if wake_source is not None:  # PostgreSQL LISTEN/NOTIFY
                options["wake_source"] = wake_source
            worker = Worker(
                kernel, self.options, logger=self.log, registry=backend.workers, **options
            )
            self.worker = worker
            if signals.first.is_set():  # signalled while the backend was opening
                return self._exit_code()
            await worker.start()
            servers = await self._serve_endpoints(backend, setup)
            self.log.info(
                "worker.ready",
                db=redact_url(self.db),
                backend=backend.kind,
                workflows=sorted(wf.id for wf in self.workflows),
                queues=list(self.options.queues),
                pid=os.getpid(),
            )
            await signals.first.wait()
            await self._drain(worker, signals)
            return self._exit_code()
        finally:
            for server in servers:
                await server.aclose()
            if unwatch is not None:
                unwatch()
            if kernel is not None:
                kernel.close()  # parked code-workflow bodies: closed before their storage
            await self._close(backend)
            if setup is not None:
                setup.shutdown()  # flush spans and metrics still buffered

    async def _serve_endpoints(self, backend: Any, setup: Any) -> list[ProbeServer]:
        """Start the metrics and health endpoints asked for (one server when the ports
        are the same); their bound ports go to ``ports_bound``."""
        routes: dict[int, dict[str, Route]] = {}
        if self.health_port is not None:
            timeout = max(3 * self.options.orchestration_interval, 30.0)
            routes.setdefault(self.health_port, {}).update(
                {
                    "/healthz": healthz_route(lambda: self.worker, timeout),
                    "/readyz": readyz_route(self.db),
                }
            )
        if self.metrics_port is not None and setup is not None:
            gauges = setup.telemetry.storage_gauges(
                backend.persistence, backend.clock, backend.workers
            )
            gauges.queues.update(self.options.queues)
            routes.setdefault(self.metrics_port, {})["/metrics"] = metrics_route(
                setup.metrics_text, gauges.refresh
            )
        servers: list[ProbeServer] = []
        for port, table in routes.items():
            server = ProbeServer(table)
            bound = await server.start(port)
            servers.append(server)
            if "/metrics" in table:
                self.ports_bound["metrics"] = bound
            if "/healthz" in table:
                self.ports_bound["health"] = bound
        if servers:
            self.log.info("worker.endpoints", **self.ports_bound)
        return servers

    async def _drain(self, worker: Worker, signals: _Signals) -> None:
        graceful = asyncio.ensure_future(worker.aclose(self.drain_timeout))
        forced = asyncio.ensure_future(signals.second.wait())
        await asyncio.wait([graceful, forced], return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if graceful.done():
            graceful.result()
            return
        # Second signal: cancel what runs now and release it, but do not wait long.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.aclose(0), FORCED_EXIT_GRACE)
        graceful.cancel()  # the stop itself is shielded; this only drops our wait
        with contextlib.suppress(asyncio.CancelledError):
            await graceful

    def _exit_code(self) -> int:
        assert self._signals is not None
        if self._signals.second.is_set():
            return 128 + self._signals.signum
        return EXIT_OK

    async def _close(self, backend: Any) -> None:
        forced = self._signals is not None and self._signals.second.is_set()
        try:
            await asyncio.wait_for(backend.aclose(), FORCED_EXIT_GRACE if forced else 30.0)
        except Exception as exc:  # closing is best effort on the way out
            self.log.warning("worker.close_failed", error=describe_exception(exc))
        self.log.info("worker.exited", code=self._exit_code())


def _error_line(exc: BaseException, db: str) -> None:
    """One stderr line for a failure to start; any credential of ``db`` that a driver's
    message repeats is hidden."""
    text = exc.message if isinstance(exc, TreadleError) else str(exc)
    print(f"treadle worker: {' '.join(scrub(text, db).split())}", file=sys.stderr, flush=True)


def _configure_logging() -> Any:
    """A stderr handler for the ``treadle`` loggers, unless the process already gave them
    one; returns the function that undoes it."""
    logger = logging.getLogger("treadle")
    if logger.handlers:
        return lambda: None
    level_name = os.environ.get(_LOG_LEVEL_ENV, "INFO").upper()
    level = logging.getLevelName(level_name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level if isinstance(level, int) else logging.INFO)
    logger.propagate = False

    def restore() -> None:
        handler.flush()
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]

    return restore


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
