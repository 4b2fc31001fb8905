"""structlog logging for the kernel, routed through the standard library.

Treadle is a library: it must not configure logging for the application. This
logger binds run, stage and worker ids with structlog, drops records below the
``treadle`` logger's level before rendering them (so disabled debug logs cost
almost nothing on the hot path), and hands the rendered line to
``logging.getLogger("treadle")``, where the application's handlers decide.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import structlog

_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class _LevelCheckedLogger(structlog.stdlib.BoundLogger):
    """Asks the standard library logger whether the level is enabled before building the
    event dict. ``filter_by_level`` would drop the record too, but only after copying the
    bound context and raising ``DropEvent``: the kernel logs every stage's outcome at
    info, which most deployments filter out."""

    def _proxy_to_logger(
        self, method_name: str, event: str | None = None, *event_args: str, **event_kw: Any
    ) -> Any:
        level = _METHOD_LEVELS.get(method_name)
        if level is not None and not self._logger.isEnabledFor(level):
            return None
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)

    # ``info`` and ``debug`` check the level themselves: the kernel logs every stage's
    # outcome at info, and going through ``_proxy_to_logger`` first would repack its
    # keywords into a second dict only to drop them.
    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.INFO):
            return None
        return structlog.stdlib.BoundLogger._proxy_to_logger(self, "info", event, *args, **kw)

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.DEBUG):
            return None
        return structlog.stdlib.BoundLogger._proxy_to_logger(self, "debug", event, *args, **kw)


_STAMPER = structlog.processors.TimeStamper(fmt="iso", utc=True)


def _stamp_unless_given(logger: Any, method_name: str, event_dict: Any) -> Any:
    """``TimeStamper``, except that a ``timestamp`` the caller passed is kept: an event's
    log line (``LogEventSink``) carries the time the event happened, not the time it was
    flushed from the outbox."""
    if "timestamp" in event_dict:
        return event_dict
    return _STAMPER(logger, method_name, event_dict)


def structlog_logger(name: str = "treadle", **bound: Any) -> Any:
    """A structlog ``BoundLogger`` over ``logging.getLogger(name)``; nothing global is set."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        wrapper_class=_LevelCheckedLogger,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.processors.add_log_level,
            _stamp_unless_given,
            add_trace_ids,
            structlog.processors.format_exc_info,
            renderer(),
        ],
    ).bind(**bound)


LOG_FORMAT_ENV = "TREADLE_LOG_FORMAT"
"""``console`` (the default: ``key=value`` lines) or ``json`` (one JSON object a line)."""

LOG_FORMATS = ("console", "json")


def log_format(environ: Mapping[str, str] | None = None) -> str:
    """The log format ``TREADLE_LOG_FORMAT`` asks for; ``ValueError`` naming the variable
    for anything but ``console`` or ``json``."""
    env = os.environ if environ is None else environ
    value = env.get(LOG_FORMAT_ENV, "").strip().lower() or "console"
    if value not in LOG_FORMATS:
        raise ValueError(
            f"{LOG_FORMAT_ENV} must be one of {', '.join(LOG_FORMATS)}, got {env[LOG_FORMAT_ENV]!r}"
        )
    return value


def renderer(fmt: str | None = None) -> Any:
    """The last processor of Treadle's loggers for ``fmt`` (``log_format()`` if omitted):
    ``KeyValueRenderer`` with the event and ids first, or ``JSONRenderer``."""
    if (fmt or log_format()) == "json":
        return structlog.processors.JSONRenderer(default=_json_default)
    return structlog.processors.KeyValueRenderer(key_order=["event", "run_id", "stage_id"])


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def add_trace_ids(logger: Any, method_name: str, event_dict: Any) -> Any:
    """Add ``trace_id`` and ``span_id`` of the current OpenTelemetry span, if there is
    one: inside a stage, step or activation with tracing on, every line carries them.
    Looks OpenTelemetry up among the loaded modules only, so a process without it (or
    that never loaded it) pays one dictionary lookup per line it writes."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return event_dict
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", f"{ctx.trace_id:032x}")
        event_dict.setdefault("span_id", f"{ctx.span_id:016x}")
    return event_dict
