"""``GET /metrics``: Treadle's metrics in the Prometheus text format, for ``treadle serve``
(``--metrics``) or any app from ``create_app`` whose engine has telemetry.

Mounted by ``create_app`` (``OPTIONAL_MODULES``). It renders the Prometheus registry of
the engine's ``OtelTelemetry`` (``prometheus_registry``: set by
``adapters.otel.configure_from_env``, which ``treadle serve --metrics`` uses), else the
default ``prometheus_client`` registry, where an application's own
``PrometheusMetricReader`` registers. Before rendering it refreshes the gauges read from
storage (queue depth, oldest waiting job, outbox lag, dead letters). It needs the
``read`` scope when the app has tokens (Prometheus sends one with ``authorization:``);
an engine without telemetry answers 404 saying how to turn metrics on. Importing this
module imports no OpenTelemetry: that happens on the first scrape of an engine that has it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from treadle.hosts.http.deps import ApiError, require_read
from treadle.hosts.http.state import HttpState, http_state

__all__ = ["mount", "router"]

router = APIRouter(tags=["metrics"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/metrics", dependencies=[Depends(require_read)], response_class=Response)
async def metrics(request: Request) -> Response:
    """Treadle's metrics (docs/observability.md), Prometheus text format."""
    engine = http_state(request).engine
    telemetry: Any = engine.kernel.deps.telemetry
    if telemetry is None or not hasattr(telemetry, "storage_gauges"):
        raise ApiError(
            404,
            "MetricsOff",
            "metrics are off: run `treadle serve --metrics` (the otel extra), or open the "
            "Engine with telemetry=True",
        )
    from treadle.adapters.otel import prometheus_text

    backend = engine.backend
    gauges = telemetry.storage_gauges(
        engine.kernel.deps.persistence,
        engine.kernel.deps.clock,
        backend.workers if backend is not None else None,
    )
    # Storage down: the other metrics still answer; the gauges keep their last reading.
    with contextlib.suppress(Exception):
        await gauges.refresh()
    body = prometheus_text(getattr(telemetry, "prometheus_registry", None))
    return Response(content=body, media_type=CONTENT_TYPE)


def mount(app: FastAPI, state: HttpState) -> None:
    app.include_router(router)
