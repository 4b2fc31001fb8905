"""``treadle runs list`` (filters, table, JSON) and ``treadle runs show`` (timeline,
attempts, errors, truncated outputs)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from treadle.hosts.cli.common import CliError
from treadle.hosts.cli.runs import parse_when
from treadle.tests.cli.helpers import Invoke, drive, one_error_line, started


@pytest.fixture
def three_runs(db_url: str, invoke: Invoke) -> dict[str, str]:
    """A completed greeter, a failed broken run and a pending greeter."""
    done = started(invoke("start", "greeter", '{"name": "done"}'))
    drive(db_url, done, {"COMPLETED"})
    failed = started(invoke("start", "broken", '{"name": "bad"}'))
    drive(db_url, failed, {"FAILED"})
    pending = started(invoke("start", "greeter", '{"name": "later"}'))
    return {"done": done, "failed": failed, "pending": pending}


def _ids(invoke: Invoke, *args: str) -> list[str]:
    result = invoke("runs", "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return [run["id"] for run in json.loads(result.stdout)]


def test_runs_list_table_shows_every_run_with_counts(
    invoke: Invoke, three_runs: dict[str, str]
) -> None:
    """The table lists each run id, its status and a per-status count caption."""
    result = invoke("runs", "list")
    assert result.exit_code == 0, result.output
    for run_id in three_runs.values():
        assert run_id in result.stdout
    for status in ("COMPLETED", "FAILED", "PENDING"):
        assert status in result.stdout
    assert "3 matching" in result.stdout
    assert "cannot process bad" in result.stdout


def test_runs_list_filters_by_status_and_workflow(
    invoke: Invoke, three_runs: dict[str, str]
) -> None:
    """--status (any case) and --workflow narrow the list."""
    assert _ids(invoke, "--status", "failed") == [three_runs["failed"]]
    assert set(_ids(invoke, "--workflow", "greeter")) == {three_runs["done"], three_runs["pending"]}
    assert _ids(invoke, "--workflow", "greeter", "--status", "PENDING") == [three_runs["pending"]]


def test_runs_list_filters_by_created_range_and_limit(
    invoke: Invoke, three_runs: dict[str, str]
) -> None:
    """--created-after/--created-before accept ages and ISO times; --limit caps, newest first."""
    assert len(_ids(invoke, "--created-after", "1h")) == 3
    assert _ids(invoke, "--created-before", "1h") == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert _ids(invoke, "--created-after", future) == []
    assert len(_ids(invoke, "--created-before", future)) == 3
    assert _ids(invoke, "--limit", "1") == [three_runs["pending"]]


def test_runs_list_rejects_a_bad_status_in_one_line(invoke: Invoke) -> None:
    """An unknown status is a one-line validation error naming the allowed values."""
    line = one_error_line(invoke("runs", "list", "--status", "DONE"))
    assert "status" in line
    assert "COMPLETED" in line


def test_runs_list_rejects_a_bad_time_in_one_line(invoke: Invoke) -> None:
    """A created filter that is neither ISO nor an age is one line."""
    line = one_error_line(invoke("runs", "list", "--created-after", "yesterday"))
    assert "--created-after" in line


def test_parse_when_accepts_ages_and_naive_iso_as_utc() -> None:
    """Ages count back from now; a naive ISO time means UTC."""
    now = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert parse_when("90m", "--x", now) == now - timedelta(minutes=90)
    assert parse_when("2d", "--x", now) == now - timedelta(days=2)
    assert parse_when("2026-01-01T00:00:00", "--x") == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_when(None, "--x") is None
    with pytest.raises(CliError):
        parse_when("soon", "--x")


def test_runs_show_draws_the_timeline_attempts_and_truncated_output(
    invoke: Invoke, three_runs: dict[str, str]
) -> None:
    """show lists each stage with attempts, the failed attempt with its error, and cuts
    long outputs with an ellipsis."""
    result = invoke("runs", "show", three_runs["done"], "--width", "40")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "greet" in out
    assert "shout" in out
    assert "failed attempts" in out
    assert "upstream hiccup" in out
    assert "…" in out  # shout's 200-character output is truncated
    assert "x" * 100 not in out


def test_runs_show_of_a_failed_run_shows_its_error(
    invoke: Invoke, three_runs: dict[str, str]
) -> None:
    """A failed run shows FAILED and the stage's error."""
    result = invoke("runs", "show", three_runs["failed"])
    assert result.exit_code == 0, result.output
    assert "FAILED" in result.stdout
    assert "cannot process bad" in result.stdout


def test_runs_show_json_has_the_stages(invoke: Invoke, three_runs: dict[str, str]) -> None:
    """--json prints the run with its stages and their attempts."""
    result = invoke("runs", "show", three_runs["done"], "--json")
    run = json.loads(result.stdout)
    assert [s["stage_id"] for s in run["stages"]] == ["greet", "shout"]
    assert [s["attempt"] for s in run["stages"]] == [1, 2]


def test_runs_show_of_an_unknown_run_is_one_line(invoke: Invoke) -> None:
    """show of a missing run id is RunNotFoundError in one line."""
    assert invoke("migrate", app=None).exit_code == 0
    assert "RunNotFoundError" in one_error_line(invoke("runs", "show", "nope"))


def test_user_data_that_looks_like_markup_is_printed_verbatim(db_url: str, invoke: Invoke) -> None:
    """Errors and outputs are data: brackets in them are shown, not read as Rich styles."""
    waited = invoke("start", "broken", '{"name": "[b]x"}', "--wait", "--local-worker")
    assert waited.exit_code == 1
    assert "✗" in waited.stdout
    assert "cannot process [b]x" in waited.stdout  # the progress line shows the error
    run_id = json.loads(invoke("runs", "list", "--json").stdout)[0]["id"]
    for args in (("runs", "list"), ("runs", "show", run_id), ("events", run_id)):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert "cannot process [b]x" in result.stdout, args
