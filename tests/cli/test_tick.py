"""``treadle tick``: one maintenance tick, its exit code and its ``--json`` report."""

from __future__ import annotations

import json

import pytest

from treadle.adapters.event_sinks import LogEventSink
from treadle.kernel.events import EventBase
from treadle.runtime.tick import STEP_ORDER
from treadle.tests.cli.helpers import UNREACHABLE_PG, Invoke, one_error_line, show_json, started


@pytest.fixture
def broken_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every publish to the default SQL event sink raises."""

    async def publish(self: LogEventSink, event: EventBase) -> None:
        raise ConnectionError("event bus down")

    monkeypatch.setattr(LogEventSink, "publish", publish)


def test_tick_claims_pending_runs_and_exits_zero(invoke: Invoke) -> None:
    """A tick claims the PENDING run (now RUNNING) and prints a table of its steps."""
    run_id = started(invoke("start", "greeter", '{"name": "t"}'))
    result = invoke("tick")
    assert result.exit_code == 0, result.output
    for step in STEP_ORDER:
        assert step in result.stdout
    assert show_json(invoke, run_id)["status"] == "RUNNING"


def test_tick_json_prints_every_step_result(invoke: Invoke) -> None:
    """--json reports ok, no failed steps, and each step's result in STEP_ORDER."""
    run_id = started(invoke("start", "greeter", '{"name": "t"}'))
    result = invoke("tick", "--json", "--worker-id", "cron-1")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["failed_steps"] == []
    assert report["worker_id"] == "cron-1"
    assert list(report["steps"]) == list(STEP_ORDER)
    claimed = report["steps"]["claim"]["result"]["claimed"]
    assert [c["workflow_run_id"] for c in claimed] == [run_id]
    assert report["steps"]["flush_outbox"]["result"]["published"] >= 1


def test_tick_without_an_app_leaves_runs_pending(invoke: Invoke) -> None:
    """Without --app the tick still runs (reaping, flushing) and skips claims it cannot
    serve, so a cron job with no app never breaks runs."""
    run_id = started(invoke("start", "greeter", '{"name": "t"}'))
    result = invoke("tick", app=None)
    assert result.exit_code == 0, result.output
    assert show_json(invoke, run_id)["status"] == "PENDING"


@pytest.mark.usefixtures("broken_sink")
def test_tick_with_a_broken_event_sink_names_the_failing_step(invoke: Invoke) -> None:
    """A sink that cannot publish makes the tick exit 1 naming flush_outbox; other steps
    still ran (the claim happened)."""
    run_id = started(invoke("start", "greeter", '{"name": "t"}'))
    result = invoke("tick")
    assert result.exit_code == 1
    assert "tick failed: step flush_outbox" in result.stderr
    assert show_json(invoke, run_id)["status"] == "RUNNING"


@pytest.mark.usefixtures("broken_sink")
def test_tick_json_reports_the_failed_step(invoke: Invoke) -> None:
    """With --json the report marks flush_outbox failed and still exits 1."""
    started(invoke("start", "greeter", '{"name": "t"}'))
    result = invoke("tick", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["failed_steps"] == ["flush_outbox"]
    assert report["steps"]["flush_outbox"]["ok"] is False
    assert report["steps"]["claim"]["ok"] is True


def test_tick_on_an_unreachable_database_is_one_line(invoke: Invoke) -> None:
    """An unreachable database fails the tick with one line and exit 1, no traceback."""
    line = one_error_line(invoke("tick", db=UNREACHABLE_PG))
    assert line.startswith("error:")
    assert "Traceback" not in line
