"""Code workflows from the shell: ``query``, ``update``, ``review``; ``runs show`` lists
the journal's steps and timers; ``rerun`` points to ``fork``; ``rerun --config``."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from treadle.tests.cli.cliapp import workflows
from treadle.tests.cli.helpers import Invoke, drive, one_error_line, show_json, started


@pytest.fixture
def worker(db_url: str, invoke: Invoke) -> Iterator[None]:
    """A worker in a background thread on the test's database (for ``update``, which
    waits for the body's reply while the command runs)."""
    assert invoke("migrate", app=None).exit_code == 0
    stop = threading.Event()

    def serve() -> None:
        from treadle.engine import Engine

        async def go() -> None:
            engine = await Engine.open(db_url, workflows=workflows)
            async with engine, engine.worker(orchestration_interval=0.05, job_poll_interval=0.02):
                await asyncio.to_thread(stop.wait)

        asyncio.run(go())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=10)


def _query(invoke: Invoke, run_id: str, name: str) -> Any:
    result = invoke("query", run_id, name)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_query_update_and_review_steer_a_run_to_completion(
    db_url: str, invoke: Invoke, worker: None
) -> None:
    """query reads what the body published; update returns the body's reply; review
    decides the waiting review (found without --review-id) and the run completes."""
    run_id = started(invoke("start", "steered", '{"name": "ada"}'))
    assert _query(invoke, run_id, "nothing-published") is None
    drive_until(invoke, run_id, lambda: _query(invoke, run_id, "phase") is not None)
    assert _query(invoke, run_id, "phase") == {"waiting": "rename", "letters": 3}

    reply = invoke("update", run_id, "rename", "--payload", '{"name": "grace"}', "--timeout", "20")
    assert reply.exit_code == 0, reply.output
    assert json.loads(reply.stdout) == "renamed to grace"

    drive_until(invoke, run_id, lambda: _query(invoke, run_id, "phase")["waiting"] == "review")
    shown = invoke("runs", "show", run_id)
    assert "review id" in shown.stdout  # the waiting review, with the id to decide it by
    decided = invoke("review", run_id, "--decision", "approve", "--reviewer", "ops")
    assert decided.exit_code == 0, decided.output
    assert "approved" in decided.stdout
    run = drive(db_url, run_id, {"COMPLETED", "FAILED"})
    assert run["output"] == {"text": "grace approved"}
    again = one_error_line(invoke("review", run_id, "--decision", "reject"))
    assert "has no review waiting" in again


def drive_until(invoke: Invoke, run_id: str, condition: Any, timeout: float = 20.0) -> None:
    """Wait (the background worker runs the body) until ``condition()`` holds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, show_json(invoke, run_id)
        time.sleep(0.05)


def test_update_and_review_refuse_bad_arguments(invoke: Invoke) -> None:
    """A payload given twice, or a decision other than approve/reject, is a usage error."""
    run_id = started(invoke("start", "steered", '{"name": "ada"}'))
    both = invoke("update", run_id, "rename", '{"name": "x"}', "--payload", '{"name": "y"}')
    assert both.exit_code == 2
    assert "not both" in both.stderr
    maybe = invoke("review", run_id, "--decision", "maybe")
    assert maybe.exit_code == 2
    assert "neither approve nor reject" in maybe.stderr


def test_update_without_a_reply_times_out_in_one_line(invoke: Invoke) -> None:
    """No worker runs the body: update gives up after --timeout with one line."""
    run_id = started(invoke("start", "steered", '{"name": "ada"}'))
    line = one_error_line(invoke("update", run_id, "rename", '{"name": "x"}', "--timeout", "0.2"))
    assert "unanswered" in line
    assert "is a worker running" in line


def test_runs_show_lists_journal_steps_and_timers(db_url: str, invoke: Invoke) -> None:
    """A code workflow's runs show lists each journal entry (kind, name, status, attempts,
    duration) and its live timers, instead of one `workflow` stage; --json adds both."""
    run_id = started(invoke("start", "napper", '{"name": "ada"}'))
    drive(db_url, run_id, {"SUSPENDED"})
    result = invoke("runs", "show", run_id)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "steps (journal)" in text
    assert "stages" not in text.split("steps (journal)")[0]  # no pipeline stage table
    step_line = next(line for line in text.splitlines() if " describe " in line)
    assert "step" in step_line
    assert "COMPLETED" in step_line
    assert "3 letters" in step_line
    nap_line = next(line for line in text.splitlines() if " nap " in line and "WAITING" in line)
    assert "until" in nap_line
    assert "timers" in text
    timers = text.split("timers")[1]
    assert "sleep" in timers
    assert "nap" in timers
    data = show_json(invoke, run_id)
    assert [(e["kind"], e["name"], e["status"]) for e in data["journal"]] == [
        ("step", "describe", "COMPLETED"),
        ("sleep", "sleep:nap", "WAITING"),
    ]
    assert data["journal"][0]["attempts"] == 1
    assert [(t["purpose"], t["name"]) for t in data["timers"]] == [("sleep", "sleep:nap")]


def test_rerun_of_a_code_workflow_points_to_fork(db_url: str, invoke: Invoke) -> None:
    """rerun on a code workflow run says to use `treadle fork` and names its steps."""
    run_id = started(invoke("start", "letters", '{"name": "ada"}'))
    drive(db_url, run_id, {"COMPLETED"})
    line = one_error_line(invoke("rerun", run_id, "workflow"))
    assert f"treadle fork {run_id} --from-step NAME" in line
    assert "its steps: count, describe" in line


def test_rerun_with_config_fixes_a_bad_config(db_url: str, invoke: Invoke) -> None:
    """A run that failed on its config re-runs the failed stage with --config, keeping
    the earlier stage's output and the config of stages it does not name."""
    config = '{"greet": {"punctuation": "?"}, "clip": {"max_length": 4}}'
    run_id = started(invoke("start", "clipped", '{"name": "ada"}', "--config", config))
    failed = drive(db_url, run_id, {"FAILED"})
    assert "longer than max_length=4" in failed["error"]

    line = one_error_line(
        invoke("rerun", run_id, "clip", "--config", '{"clip": {"max_length": "x"}}')
    )
    assert "config.clip.max_length" in line
    kept = one_error_line(invoke("rerun", run_id, "clip", "--config", '{"greet": {}}'))
    assert "config.greet" in kept or "'greet'" in kept
    assert show_json(invoke, run_id)["status"] == "FAILED"  # refused reruns change nothing

    result = invoke("rerun", run_id, "clip", "--config", '{"clip": {"max_length": 50}}')
    assert result.exit_code == 0, result.output
    run = drive(db_url, run_id, {"COMPLETED", "FAILED"})
    assert run["status"] == "COMPLETED"
    assert run["output"] == {"text": "hello ada?"}
    assert run["config"] == {"greet": {"punctuation": "?"}, "clip": {"max_length": 50}}


def test_runs_show_lists_failed_step_attempts(db_url: str, invoke: Invoke) -> None:
    """A step that failed for good shows as FAILED with its attempts in the journal, and
    each failed attempt is listed with its error and whether it was retried."""
    run_id = started(invoke("start", "refuser", '{"name": "ada"}'))
    drive(db_url, run_id, {"FAILED"})
    text = invoke("runs", "show", run_id).stdout
    journal, attempts = text.split("steps (journal)")[1].split("failed attempts")
    step_line = next(line for line in journal.splitlines() if " refuse " in line)
    assert "FAILED" in step_line
    assert "│   2 │" in step_line  # attempts
    failed = [line for line in attempts.splitlines() if " refuse " in line]
    assert len(failed) == 2
    assert "at " in failed[0]  # retried at a time
    assert "│ no " in failed[1]
    assert all("refusing ada" in line for line in failed)


def test_runs_show_names_both_links_of_a_continue_as_new_chain(db_url: str, invoke: Invoke) -> None:
    """A run that continued as new shows ``continued as`` (table and JSON); the new run
    shows ``continued from``."""
    first = started(invoke("start", "relay", '{"name": "first"}'))
    drive(db_url, first, {"COMPLETED"})
    data = show_json(invoke, first)
    second = data["continued_as"]
    assert second
    assert data["output"] is None
    drive(db_url, second, {"COMPLETED"})
    assert show_json(invoke, second)["continued_from"] == first
    table = invoke("runs", "show", first)
    assert table.exit_code == 0, table.output
    assert "continued as" in table.stdout
    assert second in table.stdout
    table = invoke("runs", "show", second)
    assert "continued from" in table.stdout
    assert first in table.stdout
