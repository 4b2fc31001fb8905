"""Whether the environment asks for OpenTelemetry tracing, read without importing it
(the ``otel`` extra may be absent): ``TREADLE_OTEL`` true, or an OTLP endpoint set."""

from __future__ import annotations

import os
from collections.abc import Mapping

OTEL_ENV = "TREADLE_OTEL"
OTLP_TRACE_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_TRUE = frozenset({"1", "true", "yes", "on"})


def tracing_asked(environ: Mapping[str, str] | None = None) -> bool:
    """``TREADLE_OTEL=1`` (or ``true``, ``yes``, ``on``), or an OTLP endpoint set."""
    env = os.environ if environ is None else environ
    if env.get(OTEL_ENV, "").strip().lower() in _TRUE:
        return True
    return any(env.get(name) for name in OTLP_TRACE_ENDPOINTS)
