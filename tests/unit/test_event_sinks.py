"""LogEventSink: one structured log line per event, user payloads left out by default."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from treadle.adapters.event_sinks import LogEventSink
from treadle.kernel.events import StageFailed, WorkflowCompleted


class RecordingLogger:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


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
