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


def structlog_logger(name: str = "treadle", **bound: Any) -> Any:
    """A structlog ``BoundLogger`` over ``logging.getLogger(name)``; nothing global is set."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event", "run_id", "stage_id"]),
        ],
    ).bind(**bound)
