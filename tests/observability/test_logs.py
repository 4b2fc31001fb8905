"""``TREADLE_LOG_FORMAT=json``: every line is a JSON object; lines inside a stage carry
the stage span's trace and span ids."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from treadle import Engine
from treadle.adapters.logging import log_format
from treadle.tests.observability.conftest import Otel
from treadle.tests.observability.otelapp import workflows

TREADLE = str(Path(sys.executable).with_name("treadle"))


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_json_logs_parse_and_carry_the_stage_span(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each line parses; the stage's lines name its span (``trace_id``, ``span_id``)."""
    monkeypatch.setenv("TREADLE_LOG_FORMAT", "json")
    handler = _Lines()
    logger = logging.getLogger("treadle")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        engine = await Engine.open("memory://", workflows, telemetry=otel.telemetry)  # type: ignore[arg-type]
        async with engine, engine.worker(orchestration_interval=0.05, job_poll_interval=0.05):
            handle = await engine.start("broken", {"n": 1})
            with pytest.raises(Exception, match="bad data"):
                await handle.result(timeout=20)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    records = [json.loads(line) for line in handler.lines]  # every line is JSON
    assert records
    spans = {s.context.span_id: s for s in otel.named("treadle.stage explode")}
    inside = [r for r in records if r.get("event") == "stage.failed"]
    assert len(inside) == 2  # both attempts
    for record in inside:
        span = spans[int(record["span_id"], 16)]
        assert record["trace_id"] == f"{span.context.trace_id:032x}"
        assert record["attempt"] == span.attributes["treadle.attempt"]
        assert record["run_id"] == handle.run_id
        assert record["level"] == "warning"


def test_a_bad_log_format_is_refused_naming_the_variable() -> None:
    """``TREADLE_LOG_FORMAT=xml`` is a bad option: ``ValueError`` naming the variable, and
    ``treadle worker`` exits 2 with that line."""
    with pytest.raises(ValueError, match="TREADLE_LOG_FORMAT must be one of console, json"):
        log_format({"TREADLE_LOG_FORMAT": "xml"})
    assert log_format({}) == "console"
    done = subprocess.run(
        [
            TREADLE,
            "worker",
            "--app",
            "treadle.tests.observability.otelapp:workflows",
            "--db",
            "memory://",
        ],
        env={"TREADLE_LOG_FORMAT": "xml", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "TREADLE_LOG_FORMAT must be one of console, json, got 'xml'" in done.stderr
