"""LogEventSink: one structured log line per event, user payloads left out by default."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from treadle.adapters.event_sinks import LogEventSink
from treadle.kernel.events import (
    EventBase,
    StageCompleted,
    StageFailed,
    StepFailed,
    WorkflowCompleted,
    WorkflowFailed,
)


class RecordingLogger:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []
        self.levels: list[str] = []

    def _record(self, level: str, event: str, fields: dict[str, Any]) -> None:
        self.lines.append((event, fields))
        self.levels.append(level)

    def info(self, event: str, **fields: Any) -> None:
        self._record("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._record("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._record("error", event, fields)


NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def test_each_event_is_one_line_named_after_its_type() -> None:
    """The line is named by the event type and carries run id, sequence and event fields."""
    log = RecordingLogger()
    sink = LogEventSink(log)
    await sink.publish(
        StageFailed(
            workflow_run_id="r1", sequence=4, timestamp=NOW, stage_id="s", attempt=2, error="boom"
        )
    )
    [(name, fields)] = log.lines
    assert name == "stage:failed"
    assert fields["run_id"] == "r1"
    assert fields["sequence"] == 4
    assert fields["stage_id"] == "s"
    assert fields["error"] == "boom"
    assert "workflow_run_id" not in fields


async def test_payloads_are_omitted_unless_requested() -> None:
    """Outputs stay out of logs by default (weaker access control than the database)."""
    event = WorkflowCompleted(workflow_run_id="r1", sequence=9, timestamp=NOW, output={"pii": 1})
    quiet, verbose = RecordingLogger(), RecordingLogger()
    await LogEventSink(quiet).publish(event)
    await LogEventSink(verbose, include_payloads=True).publish(event)
    assert "output" not in quiet.lines[0][1]
    assert verbose.lines[0][1]["output"] == {"pii": 1}


async def test_default_logger_needs_no_configuration() -> None:
    """The default sink logs through the stdlib 'treadle.events' logger without set-up."""
    await LogEventSink().publish(WorkflowCompleted(workflow_run_id="r1", timestamp=NOW))


RETRY_AT = NOW + timedelta(seconds=30)
LEVELS: list[tuple[EventBase, str]] = [
    (StageCompleted(workflow_run_id="r", timestamp=NOW, stage_id="s", attempt=1), "info"),
    (
        StageFailed(
            workflow_run_id="r",
            timestamp=NOW,
            stage_id="s",
            attempt=1,
            error="E",
            will_retry=True,
            retry_at=RETRY_AT,
        ),
        "warning",
    ),
    (StageFailed(workflow_run_id="r", timestamp=NOW, stage_id="s", attempt=3, error="E"), "error"),
    (
        StepFailed(
            workflow_run_id="r",
            timestamp=NOW,
            step="charge",
            occurrence=1,
            attempt=1,
            error="E",
            will_retry=True,
            retry_at=RETRY_AT,
        ),
        "warning",
    ),
    (
        StepFailed(
            workflow_run_id="r", timestamp=NOW, step="charge", occurrence=1, attempt=3, error="E"
        ),
        "error",
    ),
    (WorkflowFailed(workflow_run_id="r", timestamp=NOW, error="E"), "error"),
]


@pytest.mark.parametrize(("event", "level"), LEVELS, ids=lambda v: getattr(v, "type", v))
async def test_failures_are_logged_at_warning_or_error(event: EventBase, level: str) -> None:
    """A failed attempt that will be retried is a warning; a stage, step or run that
    failed for good is an error; other state changes stay at info."""
    log = RecordingLogger()
    await LogEventSink(log).publish(event)
    assert log.levels == [level]


async def test_logged_timestamp_is_the_events_own_time(caplog: pytest.LogCaptureFixture) -> None:
    """Through the default structlog logger, the line's timestamp is when the event
    happened (here long ago), not when the outbox flush published it, and a failure for
    good reaches the stdlib ``treadle.events`` logger at ERROR."""
    long_ago = datetime(2020, 5, 17, 8, 30, tzinfo=UTC)
    event = StageFailed(
        workflow_run_id="r9", sequence=2, timestamp=long_ago, stage_id="s", attempt=1, error="E"
    )
    with caplog.at_level(logging.INFO, logger="treadle.events"):
        await LogEventSink().publish(event)
    [record] = [r for r in caplog.records if r.name == "treadle.events"]
    assert record.levelno == logging.ERROR
    line = record.getMessage()
    assert "timestamp='2020-05-17T08:30:00Z'" in line
    assert str(datetime.now(UTC).year) + "-" not in line
