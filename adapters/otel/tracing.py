"""``OtelTelemetry``: the kernel's Telemetry port on OpenTelemetry.

How a run that lives for days across processes becomes one trace, with no span held
open: ``Engine.start`` opens a short ``treadle.start <workflow>`` span (a child of the
caller's current span, or a new root), ends it at once, and stores its W3C
``traceparent`` with the run (``runs.trace_context``). Every stage attempt, activation
and step attempt, on whichever worker and after whatever crash or wait, opens its span
as a child of that stored context; children and continue-as-new successors inherit it.
A run with no stored context (started with tracing off, or by a schedule) still gets
one trace: a trace id and parent span id derived from its id (``derived_trace_context``),
the same in every process. Waits (sleep, signal, update, review, a step's retry
backoff, a child) are events on the activation span that suspends on them; the next
activation's span carries a ``treadle.resumed`` event.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from treadle.adapters.otel.metrics import StorageGauges, TreadleMetrics
from treadle.kernel.model import Job, Run

if TYPE_CHECKING:
    from datetime import datetime

    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from treadle.ports import Clock, Persistence, WorkerRegistry
    from treadle.ports.telemetry import AttemptSpan, AttributeValue

INSTRUMENTATION_NAME = "treadle"
_PROPAGATOR = TraceContextTextMapPropagator()
_FAILED = frozenset({"failed", "errored"})


def derived_trace_context(run_id: str) -> str:
    """The ``traceparent`` of a run that stored none: ids hashed from the run id, so
    every process puts the run's spans in the same trace."""
    digest = hashlib.sha256(run_id.encode()).digest()
    return f"00-{digest[:16].hex()}-{digest[16:24].hex()}-01"


PARENTS_CACHED = 4096
"""Runs whose parsed parent context an ``OtelTelemetry`` keeps (a run's stages come one
after another; a miss only re-parses one header)."""


class _Attempt:
    """One attempt's span and its metrics; ``end`` is idempotent."""

    __slots__ = ("_kind", "_name", "_owner", "_run", "_span", "_start")

    def __init__(self, owner: OtelTelemetry, span: Span, kind: str, run: Run, name: str) -> None:
        self._owner = owner
        self._span = span
        self._kind = kind
        self._run = run
        self._name = name
        self._start: float | None = time.perf_counter()

    @property
    def span(self) -> Span:
        return self._span

    def active(self) -> AbstractContextManager[None]:
        return _Active(self._span)

    def step(self, name: str, attempt: int, *, kind: str = "step") -> AttemptSpan:
        parent = trace.set_span_in_context(self._span)
        run = self._run
        attributes: dict[str, AttributeValue] = {
            "treadle.run.id": run.id,
            "treadle.workflow.id": run.workflow_id,
            "treadle.workflow.version": run.workflow_version,
            "treadle.step": name,
            "treadle.step.kind": kind,
            "treadle.attempt": attempt,
        }
        span = self._owner.tracer.start_span(
            f"treadle.{kind} {name}", context=parent, attributes=attributes
        )
        return _Attempt(self._owner, span, kind, run, name)

    def event(self, name: str, attributes: Mapping[str, AttributeValue]) -> None:
        self._span.add_event(name, dict(attributes))

    def end(
        self, outcome: str, *, error: BaseException | str | None = None, retrying: bool = False
    ) -> None:
        start = self._start
        if start is None:
            return
        self._start = None
        span = self._span
        span.set_attribute("treadle.outcome", outcome)
        if retrying:
            span.set_attribute("treadle.will_retry", True)
        if isinstance(error, BaseException):
            span.record_exception(error)
        elif error is not None:
            span.add_event("exception", {"exception.message": error})
        if outcome in _FAILED:
            message = error if isinstance(error, str) else repr(error) if error else outcome
            span.set_status(Status(StatusCode.ERROR, message))
        span.end()
        self._owner.metrics.attempt_ended(
            self._kind,
            self._run.workflow_id,
            self._name,
            outcome,
            time.perf_counter() - start,
            retrying,
        )


class _Active:
    """Makes a span current in this task (``context.attach``) and restores the previous
    context on exit. Unlike ``trace.use_span`` it records nothing on an exception: the
    attempt reports its outcome itself (a failed stage is a value, not an exception,
    to the kernel)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: object = None

    def __enter__(self) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))

    def __exit__(self, *exc_info: object) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]


class OtelTelemetry:
    """Spans and metrics of the work a kernel runs, on OpenTelemetry.

    ``tracer_provider`` / ``meter_provider``: where they go; the global providers (what
    the application configured, or OpenTelemetry's no-op defaults) when omitted."""

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self._providers: tuple[Any, Any] = (tracer_provider, meter_provider)
        self.tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        meter = otel_metrics.get_meter(INSTRUMENTATION_NAME, meter_provider=meter_provider)
        self.meter = meter
        self.metrics = TreadleMetrics(meter)
        self._gauges: StorageGauges | None = None
        self._parents: dict[str, Context] = {}
        self.prometheus_registry: CollectorRegistry | None = None
        """Where a Prometheus reader of ``meter_provider`` registered (``None``: the
        default registry); what ``/metrics`` renders."""

    def _parent(self, run: Run) -> Context:
        """The context ``run``'s spans are children of: its stored ``traceparent``, or
        the one derived from its id."""
        key = run.trace_context or run.id
        found = self._parents.get(key)
        if found is None:
            header = run.trace_context or derived_trace_context(run.id)
            found = _PROPAGATOR.extract({"traceparent": header})
            if len(self._parents) >= PARENTS_CACHED:
                self._parents.clear()  # cheaper than an LRU on every hit
            self._parents[key] = found
        return found

    # -- the kernel's port -----------------------------------------------------------------
    def stage_attempt(
        self, run: Run, stage_id: str, attempt: int, worker_id: str, *, kind: str
    ) -> _Attempt:
        attributes: dict[str, Any] = {
            "treadle.run.id": run.id,
            "treadle.workflow.id": run.workflow_id,
            "treadle.workflow.version": run.workflow_version,
            "treadle.attempt": attempt,
            "treadle.worker.id": worker_id,
        }
        if kind == "activation":
            name = f"treadle.activation {run.workflow_id}"
        else:
            attributes["treadle.stage"] = stage_id
            name = f"treadle.stage {stage_id}"
        span = self.tracer.start_span(
            name,
            context=self._parent(run),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        if kind == "activation" and attempt > 1:
            span.add_event("treadle.resumed", {"treadle.activation": attempt})
        return _Attempt(self, span, kind, run, stage_id)

    # -- the hosts: starts, the job path, the tick, workers ---------------------------------
    @contextmanager
    def starting(self, workflow_id: str, count: int = 1) -> Iterator[StartSpan]:
        """Around a start: a short ``treadle.start`` span in the caller's context whose
        ``traceparent`` the new run(s) store."""
        with self.tracer.start_as_current_span(
            f"treadle.start {workflow_id}",
            kind=SpanKind.PRODUCER,
            attributes={"treadle.workflow.id": workflow_id, "treadle.runs": count},
        ) as span:
            yield StartSpan(span, self.metrics)

    def runs_ended(self, run_ids: Sequence[str], outcomes: Mapping[str, Run]) -> None:
        self.metrics.runs_ended(run_ids, outcomes)

    def watch_worker(self, worker: Any) -> None:
        self.metrics.watch_worker(worker)

    def force_flush(self, timeout_millis: int = 5_000) -> None:
        """Export buffered spans and metrics now (the Lambda handler, after each
        invocation). Providers without ``force_flush`` (OpenTelemetry's no-op defaults)
        are skipped."""
        tracer_provider, meter_provider = self._providers
        for provider in (
            tracer_provider or trace.get_tracer_provider(),
            meter_provider or otel_metrics.get_meter_provider(),
        ):
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                flush(timeout_millis)

    def job_claimed(self, job: Job, now: datetime) -> None:
        self.metrics.job_claimed(job, now)

    def leases_expired(self, count: int) -> None:
        self.metrics.leases_expired(count)

    def storage_gauges(
        self, persistence: Persistence, clock: Clock, workers: WorkerRegistry | None
    ) -> StorageGauges:
        """The gauges read from storage, made once per telemetry (the first call's
        storage wins: one process serves one database)."""
        if self._gauges is None:
            self._gauges = StorageGauges(self.meter, persistence, clock, workers)
        return self._gauges


class StartSpan:
    """The span of a start: its ``traceparent``, and the run id once it is known."""

    __slots__ = ("_metrics", "span")

    def __init__(self, span: Span, metrics: TreadleMetrics) -> None:
        self.span = span
        self._metrics = metrics

    @property
    def trace_context(self) -> str | None:
        """This span's ``traceparent``; ``None`` when it is not sampled and not recording
        (the no-op provider): then the run derives its trace from its id."""
        ctx = self.span.get_span_context()
        if not ctx.is_valid:
            return None
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def started(self, run_id: str, workflow_id: str, created: bool = True) -> None:
        self.span.add_event("treadle.run", {"treadle.run.id": run_id, "treadle.created": created})
        if created:
            self._metrics.run_started(workflow_id)
