"""Event sinks beyond the in-memory one: ``LogEventSink`` writes each event as a
structlog line, the default sink of the SQL backends.

With a SQL backend the outbox itself is the durable record (``Engine.events``
reads it), so the sink's job is visibility: a log line per state change that an
operator can grep by run id. ``CollectingEventSink`` is re-exported from
``adapters.memory`` so every sink can be imported from here.
"""

from __future__ import annotations

from typing import Any

from treadle.adapters.logging import structlog_logger
from treadle.adapters.memory.event_sink import CollectingEventSink
from treadle.kernel.events import EventBase

__all__ = ["CollectingEventSink", "LogEventSink"]

_PAYLOAD_FIELDS = frozenset({"output", "payload", "attributes"})
"""Fields that carry user data: left out of log lines unless asked for, because logs
usually have weaker access control and retention rules than the database."""

_HEADER_FIELDS = frozenset({"type", "workflow_run_id", "sequence"})


def log_level(event: EventBase) -> str:
    """The logger method an event is logged with, so alerting on levels works: a failure
    that ends something (a run, a stage or step with no retry left) is ``error``; an
    attempt that will be retried, a run blocked on a version this worker lacks, or a
    compensation that failed is ``warning``; every other state change is ``info``."""
    kind = getattr(event, "type", "")
    if kind == "workflow:failed":
        return "error"
    if kind in ("stage:failed", "step:failed"):
        return "warning" if getattr(event, "will_retry", False) else "error"
    if kind == "version:mismatched" or (
        kind == "saga:compensated" and getattr(event, "failed", None)
    ):
        return "warning"
    return "info"


class LogEventSink:
    """Publishes each event as one structlog line named after the event type
    (``workflow:completed run_id=... sequence=3 ...``), through the ``treadle.events``
    stdlib logger: the application's logging configuration decides where it goes.

    The level follows ``log_level`` (failures at ``warning`` / ``error``), and the line's
    ``timestamp`` is the event's own time, not the time the outbox flush published it: a
    flush runs after the commit, sometimes much later (a retry's ``stage:failed`` would
    otherwise appear after its own ``retry_at``)."""

    def __init__(self, logger: Any = None, *, include_payloads: bool = False) -> None:
        self._log = logger if logger is not None else structlog_logger("treadle.events")
        self._exclude = _HEADER_FIELDS if include_payloads else _HEADER_FIELDS | _PAYLOAD_FIELDS

    async def publish(self, event: EventBase) -> None:
        fields = event.model_dump(mode="json", exclude=set(self._exclude), exclude_none=True)
        getattr(self._log, log_level(event))(
            getattr(event, "type", type(event).__name__),
            run_id=event.workflow_run_id,
            sequence=event.sequence,
            **fields,
        )
