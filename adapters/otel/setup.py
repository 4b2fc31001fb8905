"""Process-level OpenTelemetry set-up for Treadle's own processes (``treadle worker``,
``treadle serve``), from the standard ``OTEL_*`` environment variables.

A library must not configure OpenTelemetry for its application, so ``Engine.open`` never
calls this: an application configures its providers and passes ``telemetry=True``. The
CLI hosts are processes of their own; they call ``configure_from_env``, which

- installs a global ``TracerProvider`` with a ``BatchSpanProcessor`` when tracing is asked
  for (``TREADLE_OTEL=1``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set) and none is installed yet; the exporter is
  ``OTEL_TRACES_EXPORTER`` (``otlp``, the default: OTLP over HTTP, configured by the
  exporter's own ``OTEL_EXPORTER_OTLP_*`` variables; ``console``; ``none``);
- builds Treadle's ``MeterProvider``: a Prometheus reader on a registry of its own when
  a metrics endpoint is served, and an OTLP metric exporter when an OTLP endpoint is set
  (``OTEL_METRICS_EXPORTER=none`` turns that off). A global ``MeterProvider`` the process
  already has is used instead, with the default Prometheus registry.

``OTEL_SERVICE_NAME`` (default ``treadle``) and ``OTEL_RESOURCE_ATTRIBUTES`` name the
resource, as the SDK reads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from treadle.adapters.otel.tracing import OtelTelemetry
from treadle.adapters.otel_env import tracing_asked

_OTLP_METRIC_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")


@dataclass
class OtelSetup:
    """What ``configure_from_env`` made: the telemetry for the kernel, the Prometheus
    registry a metrics endpoint renders, and the shutdown that flushes the exporters."""

    telemetry: OtelTelemetry
    registry: CollectorRegistry
    _shutdowns: list[Callable[[], Any]] = field(default_factory=list)

    def metrics_text(self) -> bytes:
        return prometheus_text(self.registry)

    def shutdown(self) -> None:
        """Flush and stop the providers this set-up installed (idempotent)."""
        shutdowns, self._shutdowns = self._shutdowns, []
        for stop in shutdowns:
            try:
                stop()
            except Exception:  # best effort on the way out
                continue


def configure_from_env(
    *, prometheus: bool = False, environ: Mapping[str, str] | None = None
) -> OtelSetup:
    """Set up tracing and metrics for a Treadle process (module docstring)."""
    env = os.environ if environ is None else environ
    shutdowns: list[Callable[[], Any]] = []
    tracer_provider = _tracing(env, shutdowns)
    meter_provider, registry = _metrics(env, prometheus, shutdowns)
    telemetry = OtelTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    telemetry.prometheus_registry = registry
    return OtelSetup(telemetry, registry, shutdowns)


def _tracing(env: Mapping[str, str], shutdowns: list[Callable[[], Any]]) -> Any:
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider) or not tracing_asked(env):
        return None  # the process has a provider (or tracing is off): use the global one
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=_resource(env))
    kind = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif kind != "none":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    shutdowns.append(provider.shutdown)
    return provider


def _metrics(
    env: Mapping[str, str], prometheus: bool, shutdowns: list[Callable[[], Any]]
) -> tuple[Any, CollectorRegistry]:
    current = otel_metrics.get_meter_provider()
    if type(current).__module__.startswith("opentelemetry.sdk"):
        return None, REGISTRY  # the application's provider (and its Prometheus reader)
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader

    readers: list[MetricReader] = []
    registry = CollectorRegistry()
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader(disable_target_info=True, registry=registry))
    exporter = env.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower()
    if exporter == "otlp" and any(env.get(name) for name in _OTLP_METRIC_ENDPOINTS):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    provider = MeterProvider(metric_readers=readers, resource=_resource(env))
    shutdowns.append(provider.shutdown)
    return provider, registry


def _resource(env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "treadle")})


def prometheus_text(registry: CollectorRegistry | None = None) -> bytes:
    """The Prometheus text exposition of ``registry`` (the default registry if omitted)."""
    return generate_latest(registry or REGISTRY)


PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
