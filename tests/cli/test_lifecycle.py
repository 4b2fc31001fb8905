"""``treadle pause``, ``resume``, ``terminate`` and ``purge`` on a SQLite file, through
the real Typer application; ``runs list`` and ``runs show`` mark a paused run."""

from __future__ import annotations

import json

from treadle.tests.cli.helpers import Invoke, drive, one_error_line, show_json, started


def test_pause_and_resume_a_run_and_see_it_paused(db_url: str, invoke: Invoke) -> None:
    """pause holds a PENDING run (shown ``(paused)`` by runs list and runs show, and
    ``paused`` in JSON); pausing again says so; resume lets a worker complete it."""
    run_id = started(invoke("start", "greeter", '{"name": "p"}'))
    first = invoke("pause", run_id, "--reason", "deploy")
    assert first.exit_code == 0, first.output
    assert f"paused {run_id}" in first.stdout
    assert "paused already" in invoke("pause", run_id).stdout
    assert show_json(invoke, run_id)["paused"] is True
    assert "PENDING (paused)" in invoke("runs", "show", run_id).stdout
    assert "(paused)" in invoke("runs", "list").stdout
    listed = json.loads(invoke("runs", "list", "--paused", "--json").stdout)
    assert [r["id"] for r in listed] == [run_id]
    doctor = json.loads(invoke("doctor", "--json", app=None).stdout)
    check = next(c for c in doctor["checks"] if c["name"] == "paused runs")
    assert check["level"] == "ok"
    assert run_id in check["detail"]
    resumed = invoke("resume", run_id)
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed {run_id}" in resumed.stdout
    assert "not paused" in invoke("resume", run_id).stdout
    assert json.loads(invoke("runs", "list", "--paused", "--json").stdout) == []
    run = drive(db_url, run_id, {"COMPLETED"})
    assert run["paused"] is False
    events = [
        json.loads(line)["type"] for line in invoke("events", run_id, "--json").stdout.splitlines()
    ]
    assert events.index("workflow:paused") < events.index("workflow:resumed")


def test_pausing_a_finished_run_is_one_error_line_naming_it(db_url: str, invoke: Invoke) -> None:
    """pause and resume of a COMPLETED run fail with the run id and its status."""
    run_id = started(invoke("start", "greeter", '{"name": "f"}'))
    drive(db_url, run_id, {"COMPLETED"})
    for verb in ("pause", "resume"):
        line = one_error_line(invoke(verb, run_id))
        assert run_id in line
        assert "COMPLETED" in line


def test_terminate_ends_a_run_without_compensations(invoke: Invoke) -> None:
    """terminate marks the run CANCELLED and terminated; again, nothing to do."""
    run_id = started(invoke("start", "greeter", '{"name": "t"}'))
    result = invoke("terminate", run_id, "--reason", "runaway")
    assert result.exit_code == 0, result.output
    assert f"terminated {run_id}" in result.stdout
    run = show_json(invoke, run_id)
    assert run["status"] == "CANCELLED"
    assert run["terminated"] is True
    assert "CANCELLED (terminated)" in invoke("runs", "show", run_id).stdout
    assert "already finished" in invoke("terminate", run_id).stdout


def test_purge_dry_run_then_by_status(db_url: str, invoke: Invoke) -> None:
    """purge --dry-run lists the ended runs and deletes nothing; --status narrows it; a
    live run is never purged; the purged run is gone from runs show."""
    done = started(invoke("start", "greeter", '{"name": "d"}'))
    drive(db_url, done, {"COMPLETED"})
    gone = started(invoke("start", "greeter", '{"name": "g"}'))
    invoke("cancel", gone)
    live = started(invoke("start", "greeter", '{"name": "l"}'))
    dry = invoke("purge", "--older-than", "0s", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would purge 2 run(s)" in dry.stdout
    assert {done, gone} <= set(dry.stdout.split())
    assert show_json(invoke, done)["status"] == "COMPLETED"
    only = invoke("purge", "--older-than", "0", "--status", "CANCELLED")
    assert only.exit_code == 0, only.output
    assert "purged 1 run(s)" in only.stdout
    assert "no run" in one_error_line(invoke("runs", "show", gone))
    assert "purged 1 run(s)" in invoke("purge", "--older-than", "0d").stdout
    assert show_json(invoke, live)["status"] == "PENDING"


def test_purge_refuses_live_statuses_and_bad_ages(invoke: Invoke) -> None:
    """A live --status or an age that is not one is a usage error naming the option."""
    assert "--status" in one_error_line(
        invoke("purge", "--older-than", "1d", "--status", "RUNNING")
    )
    assert "--older-than" in one_error_line(invoke("purge", "--older-than", "soon"))
