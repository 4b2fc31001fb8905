"""The Lambda handler with telemetry: a stage's span is exported by the end of the
invocation that ran it (a frozen container would export nothing later)."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from treadle import Engine
from treadle.adapters.otel import OtelTelemetry
from treadle.hosts.aws_lambda import make_handler
from treadle.tests.observability.otelapp import workflows


def test_an_invocation_exports_its_spans_before_returning(treadle_sqlite_url: str) -> None:
    """Spans of the stages a ``process`` invocation ran are exported when it returns,
    though the batch processor would wait a minute, and they join the run's trace."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    starter = OtelTelemetry(tracer_provider=provider)

    async def start() -> str:
        async with await Engine.open(treadle_sqlite_url, workflows, telemetry=starter) as engine:  # type: ignore[arg-type]
            return (await engine.start("relay", {"n": 2})).run_id

    run_id = asyncio.run(start())
    provider.force_flush()
    exporter.clear()  # the start span: only the invocation's own spans from here
    handler = make_handler(
        workflows=workflows,  # type: ignore[arg-type]
        db=treadle_sqlite_url,
        telemetry=OtelTelemetry(tracer_provider=provider),
    )
    try:
        handler({"action": "tick"})
        report = handler({"action": "process"})
        assert report["processed"] >= 1
        spans = exporter.get_finished_spans()  # no flush of ours: the handler's
        stages = sorted(s.name for s in spans if s.name.startswith("treadle.stage"))
        assert stages == ["treadle.stage first", "treadle.stage second"]
        assert {s.attributes["treadle.run.id"] for s in spans} == {run_id}
        assert len({s.context.trace_id for s in spans}) == 1
    finally:
        handler.close()
        provider.shutdown()
