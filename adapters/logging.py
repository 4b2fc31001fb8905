"""structlog logging for the kernel, routed through the standard library.

Treadle is a library: it must not configure logging for the application. This
logger binds run, stage and worker ids with structlog, drops records below the
``treadle`` logger's level before rendering them (so disabled debug logs cost
almost nothing on the hot path), and hands the rendered line to
``logging.getLogger("treadle")``, where the application's handlers decide.
"""

from __future__ import annotations

import logging
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
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event", "run_id", "stage_id"]),
        ],
    ).bind(**bound)
