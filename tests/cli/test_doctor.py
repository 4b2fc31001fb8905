"""``treadle doctor``: each check's verdict and the exit code on a failed check."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from treadle.adapters.event_sinks import LogEventSink
from treadle.kernel.events import EventBase
from treadle.tests.cli.helpers import UNREACHABLE_PG, Invoke, started


def _checks(result: Any) -> dict[str, dict[str, str]]:
    report = json.loads(result.stdout)
    return {check["name"]: check for check in report["checks"]}


def test_doctor_passes_on_a_healthy_database(invoke: Invoke) -> None:
    """A migrated, idle SQLite file passes every check and exits 0."""
    assert invoke("migrate", app=None).exit_code == 0
    result = invoke("doctor", "--json", app=None)
    assert result.exit_code == 0, result.output
    checks = _checks(result)
    assert json.loads(result.stdout)["ok"] is True
    for name in (
        "connectivity", "schema", "clock skew", "stuck runs",
        "stale leases", "pending runs", "overdue polls", "dead letters",
    ):  # fmt: skip
        assert checks[name]["level"] == "ok", checks[name]
    assert "at head revision" in checks["schema"]["detail"]


def test_doctor_table_names_the_checks(invoke: Invoke) -> None:
    """Without --json doctor prints a table of the checks."""
    assert invoke("migrate", app=None).exit_code == 0
    result = invoke("doctor", app=None)
    assert result.exit_code == 0, result.output
    assert "clock skew" in result.stdout
    assert "dead letters" in result.stdout


def test_doctor_fails_on_an_unreachable_database(invoke: Invoke) -> None:
    """An unreachable PostgreSQL fails connectivity, skips the rest, exits 1."""
    result = invoke("doctor", "--json", db=UNREACHABLE_PG, app=None)
    assert result.exit_code == 1
    checks = _checks(result)
    assert checks["connectivity"]["level"] == "FAIL"
    assert checks["schema"]["level"] == "skip"
    assert "failed check(s): connectivity" in result.stderr
    assert "Traceback" not in result.output


def test_doctor_fails_on_a_missing_sqlite_file(tmp_path: Path, invoke: Invoke) -> None:
    """Doctor does not create a database: a missing file fails connectivity."""
    result = invoke("doctor", "--json", db=f"sqlite:///{tmp_path / 'absent.db'}", app=None)
    assert result.exit_code == 1
    assert "no SQLite database" in _checks(result)["connectivity"]["detail"]
    assert not (tmp_path / "absent.db").exists()


def test_doctor_fails_on_an_unmigrated_schema(tmp_path: Path, invoke: Invoke) -> None:
    """A database without Treadle's schema fails the schema check, asking for migrate."""
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    result = invoke("doctor", "--json", db=f"sqlite:///{path}", app=None)
    assert result.exit_code == 1
    schema = _checks(result)["schema"]
    assert schema["level"] == "FAIL"
    assert "treadle migrate" in schema["detail"]


def test_doctor_fails_on_a_bad_url_in_one_check(invoke: Invoke) -> None:
    """A URL with an unknown scheme is a failed connectivity check, not a traceback."""
    result = invoke("doctor", "--json", db="mysql://x/y", app=None)
    assert result.exit_code == 1
    assert "unsupported database URL scheme" in _checks(result)["connectivity"]["detail"]


def test_doctor_reports_stuck_and_pending_work(invoke: Invoke) -> None:
    """A claimed run nobody executes is stuck past the threshold (FAIL); an unclaimed one
    is pending (warn)."""
    stuck = started(invoke("start", "greeter", '{"name": "s"}'))
    assert invoke("tick").exit_code == 0  # claims it: RUNNING, but no worker runs the job
    started(invoke("start", "greeter", '{"name": "p"}'))
    result = invoke(
        "doctor", "--json", "--stuck-threshold", "0", "--pending-threshold", "0", app=None
    )
    assert result.exit_code == 1
    checks = _checks(result)
    assert checks["stuck runs"]["level"] == "FAIL"
    assert stuck in checks["stuck runs"]["detail"]
    assert checks["pending runs"]["level"] == "warn"
    assert "failed check(s): stuck runs" in result.stderr


def test_doctor_reports_overdue_polls(db_url: str, invoke: Invoke) -> None:
    """A suspended stage whose check is due but nobody polls is an overdue warning."""
    from treadle.tests.cli.helpers import drive

    run_id = started(invoke("start", "batch", '{"name": "never"}'))
    drive(db_url, run_id, {"SUSPENDED"})
    result = invoke("doctor", "--json", "--overdue-threshold", "0", app=None)
    assert _checks(result)["overdue polls"]["level"] == "warn"


def test_doctor_fails_when_the_dlq_holds_events(
    monkeypatch: pytest.MonkeyPatch, invoke: Invoke, db_url: str
) -> None:
    """Events that exhausted their publish retries are in the DLQ: doctor fails, naming
    the run."""

    async def publish(self: LogEventSink, event: EventBase) -> None:
        raise ConnectionError("event bus down")

    monkeypatch.setattr(LogEventSink, "publish", publish)
    run_id = started(invoke("start", "greeter", '{"name": "d"}'))
    for _ in range(3):  # outbox retries 3 times before the DLQ (DESIGN §4)
        assert invoke("tick").exit_code == 1
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            conn.execute("UPDATE outbox SET retry_at = NULL")  # its backoff has passed
    result = invoke("doctor", "--json", app=None)
    assert result.exit_code == 1
    dead = _checks(result)["dead letters"]
    assert dead["level"] == "FAIL"
    assert run_id in dead["detail"]
