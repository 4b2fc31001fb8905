"""OpenTelemetry for Treadle (the ``otel`` extra): spans of every stage, activation and
step attempt, metrics of runs, stages, steps, queues, leases, the outbox and workers.

Nothing here is imported unless a host enables it (``Engine.open(..., telemetry=True)``,
``TREADLE_OTEL=1`` or ``--metrics-port`` for the CLI): a deployment without the extra,
or with it off, runs no OpenTelemetry code at all. ``OtelTelemetry`` uses the global
``TracerProvider`` and ``MeterProvider`` unless given others, so an application that
configured OpenTelemetry already gets Treadle's spans and metrics where it sends its own.
See docs/observability.md.
"""

from treadle.adapters.otel.metrics import METRIC_NAMES, StorageGauges, TreadleMetrics
from treadle.adapters.otel.setup import configure_from_env, prometheus_text
from treadle.adapters.otel.tracing import OtelTelemetry, derived_trace_context

__all__ = [
    "METRIC_NAMES",
    "OtelTelemetry",
    "StorageGauges",
    "TreadleMetrics",
    "configure_from_env",
    "derived_trace_context",
    "prometheus_text",
]
