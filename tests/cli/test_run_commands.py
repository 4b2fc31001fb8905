"""``treadle migrate``, ``start``, ``signal``, ``cancel``, ``rerun`` and ``events`` on a
SQLite file, through the real Typer application."""

from __future__ import annotations

import json
from pathlib import Path

from treadle.tests.cli.helpers import Invoke, drive, one_error_line, show_json, started


def test_help_lists_every_command(invoke: Invoke) -> None:
    """`treadle --help` names every command of DESIGN §7."""
    result = invoke("--help", app=None)
    assert result.exit_code == 0
    for name in (
        "migrate", "worker", "tick", "start", "signal", "cancel", "rerun", "fork",
        "runs", "events", "doctor", "demo", "query", "update", "review",
        "pause", "resume", "terminate", "purge",
    ):  # fmt: skip
        assert name in result.stdout


def test_migrate_creates_the_schema_then_reports_it_at_head(tmp_path: Path, invoke: Invoke) -> None:
    """migrate upgrades an empty database, and a second migrate is a no-op that says so."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    first = invoke("migrate", db=url, app=None)
    assert first.exit_code == 0, first.output
    assert "upgraded from empty" in first.stdout
    again = invoke("migrate", db=url, app=None)
    assert again.exit_code == 0, again.output
    assert "already at revision" in again.stdout


def test_migrate_refuses_memory_urls(invoke: Invoke) -> None:
    """memory:// has no schema: migrate says so in one line and exits non-zero."""
    line = one_error_line(invoke("migrate", db="memory://", app=None))
    assert "nothing to migrate" in line


def test_start_prints_the_run_id_and_the_run_is_pending(invoke: Invoke) -> None:
    """start creates a PENDING run with the given priority and prints only its id."""
    run_id = started(invoke("start", "greeter", '{"name": "ada"}', "--priority", "9"))
    run = show_json(invoke, run_id)
    assert run["status"] == "PENDING"
    assert run["priority"] == 9
    assert run["input"] == {"name": "ada"}


def test_start_with_an_idempotency_key_returns_the_same_run(invoke: Invoke) -> None:
    """Starting twice with one idempotency key gives one run."""
    first = started(invoke("start", "greeter", '{"name": "a"}', "--idempotency-key", "k1"))
    second = started(invoke("start", "greeter", '{"name": "a"}', "--idempotency-key", "k1"))
    assert first == second


def test_start_with_a_concurrency_key_stores_it_and_runs_show_says_so(invoke: Invoke) -> None:
    """--concurrency-key reaches the run (its per-key limits group by it)."""
    run_id = started(invoke("start", "greeter", '{"name": "k"}', "--concurrency-key", "t-1"))
    assert show_json(invoke, run_id)["concurrency_key"] == "t-1"
    shown = invoke("runs", "show", run_id, app=None)
    assert shown.exit_code == 0, shown.output
    assert "concurrency key" in shown.stdout
    assert "t-1" in shown.stdout


def test_start_reads_input_from_a_file(tmp_path: Path, invoke: Invoke) -> None:
    """INPUT may be @file.json."""
    source = tmp_path / "input.json"
    source.write_text('{"name": "from-file"}')
    run_id = started(invoke("start", "greeter", f"@{source}"))
    assert show_json(invoke, run_id)["input"] == {"name": "from-file"}


def test_start_wait_shows_progress_and_prints_the_output(invoke: Invoke) -> None:
    """start --wait --local-worker runs the workflow here, draws the progress bar and
    prints the output; --config reaches the stage."""
    result = invoke(
        "start", "greeter", '{"name": "ada"}', "--config", '{"greet": {"punctuation": "?"}}',
        "--wait", "--local-worker", "--timeout", "30",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2/2 stages" in result.stdout
    assert "COMPLETED" in result.stdout
    assert "HELLO ADA?" in result.stdout


def test_start_wait_exits_non_zero_when_the_run_fails(invoke: Invoke) -> None:
    """A run that fails makes start --wait exit 1 with the run's error."""
    result = invoke("start", "broken", '{"name": "x"}', "--wait", "--local-worker")
    assert result.exit_code == 1
    assert "FAILED" in result.stdout
    assert "cannot process x" in result.stderr


def test_start_wait_json_prints_the_run(invoke: Invoke) -> None:
    """start --wait --json prints the finished run as JSON on stdout."""
    result = invoke("start", "greeter", '{"name": "j"}', "--wait", "--local-worker", "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["status"] == "COMPLETED"
    assert run["output"]["text"].startswith("HELLO J!")


def test_start_wait_times_out_without_a_worker(invoke: Invoke) -> None:
    """With no worker, start --wait --timeout gives up with one line naming the run."""
    result = invoke("start", "greeter", '{"name": "t"}', "--wait", "--timeout", "0.2")
    line = one_error_line(result)
    assert "timed out" in line


def test_cancel_cancels_a_pending_run_once(invoke: Invoke) -> None:
    """cancel marks the run CANCELLED; cancelling again reports nothing to do."""
    run_id = started(invoke("start", "greeter", '{"name": "c"}'))
    first = invoke("cancel", run_id, "--reason", "operator")
    assert first.exit_code == 0, first.output
    assert f"cancelled {run_id}" in first.stdout
    assert show_json(invoke, run_id)["status"] == "CANCELLED"
    again = invoke("cancel", run_id)
    assert again.exit_code == 0
    assert "already finished" in again.stdout


def test_rerun_resets_the_stage_and_the_run_completes_again(db_url: str, invoke: Invoke) -> None:
    """rerun from a stage resets it and later stages; a worker then completes it again."""
    run_id = started(invoke("start", "greeter", '{"name": "r"}'))
    drive(db_url, run_id, {"COMPLETED"})
    result = invoke("rerun", run_id, "shout")
    assert result.exit_code == 0, result.output
    assert "reset shout" in result.stdout
    assert show_json(invoke, run_id)["status"] != "COMPLETED"
    run = drive(db_url, run_id, {"COMPLETED"})
    assert run["output"]["text"].startswith("HELLO R!")


def test_rerun_of_an_unknown_stage_is_one_line(db_url: str, invoke: Invoke) -> None:
    """rerun naming a stage the workflow lacks fails with one line."""
    run_id = started(invoke("start", "greeter", '{"name": "r"}'))
    drive(db_url, run_id, {"COMPLETED"})
    line = one_error_line(invoke("rerun", run_id, "no-such-stage"))
    assert "no-such-stage" in line


def test_fork_starts_a_new_run_from_a_step(db_url: str, invoke: Invoke) -> None:
    """fork prints the new run's id; it reuses the journal before the step and completes."""
    run_id = started(invoke("start", "letters", '{"name": "ada"}'))
    drive(db_url, run_id, {"COMPLETED"})
    fork_id = started(invoke("fork", run_id, "--from-step", "describe", "--idempotency-key", "k"))
    assert fork_id != run_id
    again = invoke("fork", run_id, "--from-step", "describe", "--idempotency-key", "k")
    assert started(again) == fork_id
    run = drive(db_url, fork_id, {"COMPLETED", "FAILED"})
    assert run["output"] == {"text": "3 letters"}
    assert run["search_attributes"]["forked_from"] == run_id


def test_fork_of_an_unknown_step_or_a_pipeline_is_one_line(db_url: str, invoke: Invoke) -> None:
    """fork naming a step the journal lacks, or a pipeline run, fails with one line."""
    run_id = started(invoke("start", "letters", '{"name": "ada"}'))
    drive(db_url, run_id, {"COMPLETED"})
    assert "no step 'shout'" in one_error_line(invoke("fork", run_id, "--from-step", "shout"))
    piped = started(invoke("start", "greeter", '{"name": "r"}'))
    assert "rerun_from" in one_error_line(invoke("fork", piped, "--from-step", "shout"))


def test_signal_wakes_a_waiting_code_workflow(db_url: str, invoke: Invoke) -> None:
    """signal delivers the payload to a run in wait_for_signal, which then completes."""
    run_id = started(invoke("start", "approval", '{"name": "pr-7"}'))
    drive(db_url, run_id, {"SUSPENDED"})
    result = invoke("signal", run_id, "approve", '{"approved": true}')
    assert result.exit_code == 0, result.output
    assert "delivered" in result.stdout
    run = drive(db_url, run_id, {"COMPLETED", "FAILED"})
    assert run["output"] == {"text": "pr-7 approved"}


def test_signal_with_an_invalid_payload_is_one_line(db_url: str, invoke: Invoke) -> None:
    """A payload that is not JSON is rejected before anything is sent."""
    run_id = started(invoke("start", "approval", '{"name": "pr-8"}'))
    line = one_error_line(invoke("signal", run_id, "approve", "{not json"))
    assert "PAYLOAD is not valid JSON" in line


def test_events_lists_a_finished_run_in_order(db_url: str, invoke: Invoke) -> None:
    """events prints every event with its sequence; --json gives one object per line,
    --after skips earlier ones, and --follow on a finished run ends by itself."""
    run_id = started(invoke("start", "greeter", '{"name": "e"}'))
    drive(db_url, run_id, {"COMPLETED"})
    text = invoke("events", run_id)
    assert text.exit_code == 0, text.output
    assert "workflow:created" in text.stdout
    assert "stage:failed" in text.stdout  # shout's first attempt
    assert "workflow:completed" in text.stdout
    lines = invoke("events", run_id, "--json").stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "workflow:completed"
    later = invoke("events", run_id, "--json", "--after", "2").stdout.splitlines()
    assert json.loads(later[0])["sequence"] == 3
    followed = invoke("events", run_id, "--follow", "--json", "--poll-interval", "0.01")
    assert followed.exit_code == 0
    assert len(followed.stdout.splitlines()) == len(events)


def test_events_of_an_unknown_run_is_one_line(invoke: Invoke) -> None:
    """events for a run that does not exist fails with RunNotFoundError in one line."""
    assert invoke("migrate", app=None).exit_code == 0
    line = one_error_line(invoke("events", "no-such-run"))
    assert "RunNotFoundError" in line
