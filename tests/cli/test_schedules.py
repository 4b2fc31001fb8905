"""``treadle schedules`` create, list, pause, resume, trigger and delete on a SQLite
file, through the real Typer application; ``doctor`` reports paused schedules and
``runs show`` names a scheduled run's
schedule and fire time."""

from __future__ import annotations

import json

from treadle.tests.cli.helpers import Invoke, show_json


def test_schedules_commands_manage_a_schedule(invoke: Invoke) -> None:
    """Create, list (text and JSON), pause, resume, trigger, delete, each exiting 0."""
    assert invoke("migrate", app=None).exit_code == 0
    created = invoke(
        "schedules", "create", "nightly", "greeter", "0 3 * * *",
        "--input", '{"name": "ada"}', "--timezone", "Europe/Paris",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["timezone"] == "Europe/Paris"
    listed = invoke("schedules", "list", app=None)
    assert "nightly  greeter  '0 3 * * *' Europe/Paris  next " in listed.stdout
    paused = invoke("schedules", "pause", "nightly", app=None)
    assert json.loads(paused.stdout)["paused"] is True
    assert "paused" in invoke("schedules", "list", app=None).stdout
    assert "1 paused: nightly" in invoke("doctor", app=None).stdout
    resumed = invoke("schedules", "resume", "nightly", app=None)
    assert json.loads(resumed.stdout)["next_fire_at"] is not None
    triggered = invoke("schedules", "trigger", "nightly")
    assert triggered.exit_code == 0, triggered.output
    run_id = triggered.stdout.strip()
    shown = show_json(invoke, run_id)
    assert shown["search_attributes"]["treadle.schedule_id"] == "nightly"
    text = invoke("runs", "show", run_id)
    assert "schedule nightly" in text.stdout
    rows = json.loads(invoke("schedules", "list", "--json", app=None).stdout)
    assert rows[0]["last_run_id"] == run_id
    assert invoke("schedules", "delete", "nightly", app=None).stdout.strip() == "deleted"
    assert invoke("schedules", "list", app=None).stdout.strip() == "no schedules"


def test_a_bad_expression_is_one_error_line(invoke: Invoke) -> None:
    """A cron expression croniter refuses exits non-zero naming it; nothing is created."""
    assert invoke("migrate", app=None).exit_code == 0
    bad = invoke("schedules", "create", "s", "greeter", "61 * * * *", "--input", '{"name": "x"}')
    assert bad.exit_code != 0
    assert "61 * * * *" in bad.output
    assert invoke("schedules", "list", app=None).stdout.strip() == "no schedules"
