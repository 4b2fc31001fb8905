"""AWS Lambda: ``make_handler(...)`` returns the function's ``handler(event, context)``.

::

    # app/lambda_function.py
    from treadle.hosts.aws_lambda import make_handler
    handler = make_handler(app="app.flows:workflows")   # db from TREADLE_DATABASE_URL

One handler serves three kinds of invocation, told apart by the event's shape:

- **SQS batches** (``{"Records": [{"eventSource": "aws:sqs", "messageId": ...,
  "body": ...}, ...]}``): each body names a job (``{"job_id": "..."}``) or asks for any
  available work (``{}``), and is handled by ``ServerlessHost.handle_job``. The reply
  is a partial batch response, ``{"batchItemFailures": [{"itemIdentifier":
  messageId}, ...]}``, listing only the messages to deliver again: executions that
  raised, jobs released at the deadline, messages not reached in time and malformed
  bodies (which end in the dead-letter queue). Stage failures are *not* batch
  failures: the kernel already scheduled their retry. The event source mapping
  needs ``FunctionResponseTypes: ["ReportBatchItemFailures"]``. Then
  (``process_on_message``) the function goes on with whatever became due, the stages
  the messages' jobs enqueued included (``process_available_jobs``), until the queue
  is idle or the time budget runs out: one message can carry a whole run, rather than
  one stage per message with the rest waiting for the schedule.
- **EventBridge schedules** (``"source": "aws.events"``, ``"detail-type": "Scheduled
  Event"``): one maintenance tick, then (``process_on_schedule``) the due jobs for the
  rest of the time budget, which is what runs retries whose backoff outlived their
  wake-up message. A tick with a failing step raises ``TickFailedError`` after the
  processing, so it shows in the function's error metrics.
- **Direct invocations**: ``{"action": "tick"}`` (the tick report) and
  ``{"action": "process", "max_jobs": n}`` (the ``ProcessReport``).

Everything is built once per container, on the first invocation, and reused by
warm invocations: the backend (and its connection pool), the kernel, the
``ServerlessHost`` and one event loop. A failed build (database unreachable) is not
cached; the next invocation tries again.

Time: each invocation works until ``context.get_remaining_time_in_millis()`` falls
to ``safety_buffer_ms``; from then on it takes no new work, and a job still running
is cancelled and released (back in the queue at once) so the next invocation runs
it. Size the buffer to cover releasing a job and replying (a few seconds).

With ``wakeup_queue_url`` (or ``TREADLE_WAKE_QUEUE_URL``) every job the function
commits (a run's next group, a retry) is announced on that SQS queue
(``adapters.aws.SqsWakeups``), so work continues without waiting for the schedule.
``sqs_client`` is any object with ``send_message(QueueUrl=..., MessageBody=...)``;
by default ``boto3.client("sqs")`` (the ``aws`` extra).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from treadle.adapters.aws.sqs import SqsClient, SqsWakeups
from treadle.adapters.logging import structlog_logger
from treadle.hosts.app import load_workflows
from treadle.hosts.serverless import SERVERLESS_DEFAULTS, ServerlessHost
from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import TreadleError, describe_exception
from treadle.runtime.backends import open_backend
from treadle.runtime.options import WorkerOptions
from treadle.runtime.threads import StageThreadPool
from treadle.runtime.tick import TickReport

__all__ = ["LambdaHandler", "TickFailedError", "make_handler"]

DB_ENV = "TREADLE_DATABASE_URL"
APP_ENV = "TREADLE_APP"
WAKEUP_QUEUE_ENV = "TREADLE_WAKE_QUEUE_URL"
DEFAULT_SAFETY_BUFFER_MS = 10_000


class TickFailedError(TreadleError):
    """A scheduled maintenance tick had failing steps (named in the message)."""


def make_handler(
    workflows: Iterable[WorkflowDefinition] | None = None,
    *,
    app: str | None = None,
    db: str | None = None,
    options: WorkerOptions | Mapping[str, Any] | None = None,
    worker_id: str | None = None,
    concurrency: int | None = None,
    safety_buffer_ms: int = DEFAULT_SAFETY_BUFFER_MS,
    stale_lease_threshold: float | None = None,
    process_on_schedule: bool = True,
    process_on_message: bool = True,
    wakeup_queue_url: str | None = None,
    sqs_client: SqsClient | Callable[[], SqsClient] | None = None,
    telemetry: Any = None,
) -> LambdaHandler:
    """The Lambda handler (see the module docstring). Builds nothing until invoked.

    ``workflows`` (``make_handler(workflows)``) or ``app`` (``"module:attr"``, default
    ``$TREADLE_APP``) name the workflows; ``db`` defaults to ``$TREADLE_DATABASE_URL``.
    ``options`` (a ``WorkerOptions``), ``worker_id``, ``concurrency`` (default 1) and
    ``stale_lease_threshold`` are the serverless host's options, checked here, before the
    first invocation. ``concurrency`` bounds the jobs one ``process`` call runs at once
    (SQS records are handled one after another; scale with the batch size and the
    function's concurrency).
    ``process_on_message``: after an SQS batch, keep running due jobs until the queue is
    idle or the budget is spent (``False``: each message runs its one job only).
    ``telemetry`` (an ``OtelTelemetry``; the ``otel`` extra): spans and metrics of the
    stages it runs, flushed at the end of every invocation (a frozen container exports
    nothing).
    """
    if safety_buffer_ms < 0:
        raise ValueError(f"safety_buffer_ms must be >= 0, got {safety_buffer_ms!r}")
    given = {
        "worker_id": worker_id,
        "concurrency": concurrency,
        "stale_lease_threshold": stale_lease_threshold,
    }
    return LambdaHandler(
        app=app,
        db=db,
        workflows=list(workflows) if workflows is not None else None,
        options=WorkerOptions.build(
            options,
            {k: v for k, v in given.items() if v is not None},
            defaults=SERVERLESS_DEFAULTS,
        ),
        safety_buffer_ms=safety_buffer_ms,
        process_on_schedule=process_on_schedule,
        process_on_message=process_on_message,
        wakeup_queue_url=wakeup_queue_url,
        sqs_client=sqs_client,
        telemetry=telemetry,
    )


class LambdaHandler:
    """``handler(event, context)``; one per container. ``host`` is the built
    ``ServerlessHost`` (``None`` before the first invocation)."""

    def __init__(
        self,
        *,
        app: str | None,
        db: str | None,
        workflows: list[WorkflowDefinition] | None,
        options: WorkerOptions,
        safety_buffer_ms: int,
        process_on_schedule: bool,
        wakeup_queue_url: str | None,
        sqs_client: SqsClient | Callable[[], SqsClient] | None,
        process_on_message: bool = True,
        telemetry: Any = None,
    ) -> None:
        self._app = app
        self._db = db
        self._workflows = workflows
        self.options = options
        self.safety_buffer_ms = safety_buffer_ms
        self.process_on_schedule = process_on_schedule
        self.process_on_message = process_on_message
        self._queue_url = wakeup_queue_url
        self._sqs_client = sqs_client
        self.telemetry = telemetry
        self.host: ServerlessHost | None = None
        self.wakeups: SqsWakeups | None = None
        self.builds = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.log = structlog_logger("treadle.hosts.aws_lambda")

    def __call__(self, event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
            # Sync stages run in daemon threads: one cut off at the deadline cannot pin
            # the container's shutdown.
            self._loop.set_default_executor(StageThreadPool(self.options.concurrency + 4))
        try:
            return self._loop.run_until_complete(self.handle(event, context))
        finally:
            flush = getattr(self.telemetry, "force_flush", None)
            if flush is not None:  # before the container freezes
                flush()

    def close(self) -> None:
        """Release the backend and the loop (a container never needs this; tests do)."""
        if self._loop is None or self._loop.is_closed():
            return
        if self.host is not None:
            self._loop.run_until_complete(self.host.aclose())
            self.host = None
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    async def handle(self, event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
        """The async core of ``__call__``, for callers that own a loop."""
        if not isinstance(event, Mapping):
            raise TreadleError(f"event must be a JSON object, got {type(event).__name__}")
        host = await self._host()
        records = event.get("Records")
        if isinstance(records, list) and records and _all_sqs(records):
            return await self._sqs(host, records, context)
        if event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event":
            return await self._scheduled(host, context)
        action = event.get("action")
        if action == "tick":
            return _tick_dict(await host.run_maintenance_tick())
        if action == "process":
            max_jobs = event.get("max_jobs")
            report = await host.process_available_jobs(
                max_jobs=max_jobs, deadline=self._budget(context)
            )
            return report.model_dump(mode="json")
        raise TreadleError(
            "unrecognised event: expected SQS records, an EventBridge 'Scheduled Event' or "
            f"{{'action': 'process' | 'tick'}}; got keys {sorted(event)}"
        )

    # -- the three kinds of event -------------------------------------------------------
    async def _sqs(
        self, host: ServerlessHost, records: list[Mapping[str, Any]], context: Any
    ) -> dict[str, Any]:
        failures: list[str] = []
        for index, record in enumerate(records):
            message_id = str(record.get("messageId", index))
            budget = self._budget(context)
            if budget is not None and budget <= 0:
                # Out of time: leave the rest for redelivery rather than start them.
                failures.append(message_id)
                continue
            try:
                outcome = await host.handle_job(record.get("body"), deadline=budget)
            except Exception as exc:  # a malformed body (or a bug): retry, then the DLQ
                self.log.error(
                    "lambda.message_failed", message_id=message_id, error=describe_exception(exc)
                )
                failures.append(message_id)
                continue
            if not outcome.ok:
                failures.append(message_id)
            self.log.info(
                "lambda.message",
                message_id=message_id,
                status=outcome.status,
                job_id=outcome.job_id,
                reason=outcome.reason,
            )
        await self._carry_on(host, context)
        return {"batchItemFailures": [{"itemIdentifier": m} for m in failures]}

    async def _carry_on(self, host: ServerlessHost, context: Any) -> None:
        """After a batch's messages: run what is due now, the next stages their jobs
        enqueued among it, until the queue is idle or the budget is spent. A wake-up
        message is a hint that work exists, not a ration of one job; without this the
        rest of a run would wait for the next schedule. A job cut off at the deadline is
        released for the next invocation, as any other; what this part did is logged,
        never reported as a batch failure (no message asked for it)."""
        budget = self._budget(context)
        if not self.process_on_message or (budget is not None and budget <= 0):
            return
        try:
            report = await host.process_available_jobs(deadline=budget)
        except Exception as exc:  # the messages are done; the schedule picks this up
            self.log.error("lambda.carry_on_failed", error=describe_exception(exc))
            return
        self.log.info(
            "lambda.carried_on",
            processed=report.processed,
            released=report.released,
            stopped=report.stopped,
        )

    async def _scheduled(self, host: ServerlessHost, context: Any) -> dict[str, Any]:
        report = await host.run_maintenance_tick()
        response: dict[str, Any] = {"tick": _tick_dict(report)}
        budget = self._budget(context)
        if self.process_on_schedule and (budget is None or budget > 0):
            processed = await host.process_available_jobs(deadline=budget)
            response["process"] = processed.model_dump(mode="json")
        if not report.ok:
            raise TickFailedError(f"maintenance tick failed: {report.errors}")
        return response

    # -- building, once per container ---------------------------------------------------
    async def _host(self) -> ServerlessHost:
        if self.host is None:
            self.host = await self._build()
            self.builds += 1
        return self.host

    async def _build(self) -> ServerlessHost:
        db = self._db or os.environ.get(DB_ENV)
        if not db:
            raise TreadleError(f"no database URL: pass make_handler(db=...) or set {DB_ENV}")
        workflows = (
            self._workflows
            if self._workflows is not None
            else load_workflows(self._app or os.environ.get(APP_ENV))
        )
        backend = await open_backend(db)
        queue_url = self._queue_url or os.environ.get(WAKEUP_QUEUE_ENV)
        if queue_url:
            self.wakeups = SqsWakeups(self._client(), queue_url, clock=backend.clock)
            persistence, transport = self.wakeups.wrap(backend.persistence, backend.job_transport)
            backend = dataclasses.replace(backend, persistence=persistence, job_transport=transport)
        host = await ServerlessHost.open(
            db,
            workflows,
            backend=backend,
            options=self.options,
            telemetry=self.telemetry,
        )
        self.log.info(
            "lambda.ready",
            worker_id=host.worker_id,
            backend=backend.kind,
            workflows=sorted(wf.id for wf in workflows),
            wakeups=bool(queue_url),
        )
        return host

    def _client(self) -> SqsClient:
        client = self._sqs_client
        if client is None:
            try:
                import boto3  # type: ignore[import-not-found,unused-ignore]  # the aws extra
            except ImportError as exc:
                raise TreadleError(
                    "SQS wake-ups need boto3: pip install 'treadle[aws]' (or pass sqs_client=)"
                ) from exc
            built: SqsClient = boto3.client("sqs")
            return built
        if callable(client) and not hasattr(client, "send_message"):
            return client()
        return client  # type: ignore[return-value]  # an object with send_message

    def _budget(self, context: Any) -> float | None:
        """Seconds of work left before the safety buffer; ``None`` without a context."""
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if remaining is None:
            return None
        return (float(remaining()) - self.safety_buffer_ms) / 1000.0


def _all_sqs(records: list[Any]) -> bool:
    return all(isinstance(r, Mapping) and r.get("eventSource") == "aws:sqs" for r in records)


def _tick_dict(report: TickReport) -> dict[str, Any]:
    return {"ok": report.ok, "errors": report.errors, **report.model_dump(mode="json")}
