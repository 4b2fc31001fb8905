"""Fixtures of the observability tests: an ``OtelTelemetry`` on SDK providers of its
own (never the process-global ones), with in-memory span and metric readers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from treadle.adapters.otel import OtelTelemetry


@dataclass
class Otel:
    telemetry: OtelTelemetry
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    tracer_provider: TracerProvider
    registry: CollectorRegistry
    """Where a ``PrometheusMetricReader`` of the same provider exposes the metrics."""

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name.startswith(prefix)]

    def points(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Data points of metric ``name``: sorted attributes -> value (a sum, a gauge's
        value, or a histogram's count)."""
        found: dict[tuple[tuple[str, str], ...], float] = {}
        data = self.metrics.get_metrics_data()
        for rm in data.resource_metrics if data is not None else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        attributes = point.attributes or {}
                        key = tuple(sorted((k, str(v)) for k, v in attributes.items()))
                        value: float = getattr(point, "value", None) or 0
                        found[key] = float(getattr(point, "count", value))
        return found


@pytest.fixture
def otel() -> Iterator[Otel]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    registry = CollectorRegistry()
    prometheus = PrometheusMetricReader(disable_target_info=True, registry=registry)
    meter_provider = MeterProvider(metric_readers=[reader, prometheus])
    telemetry = OtelTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    yield Otel(telemetry, spans, reader, tracer_provider, registry)
    tracer_provider.shutdown()
    meter_provider.shutdown()
