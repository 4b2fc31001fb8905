"""The CLI on PostgreSQL: the schema gate, migrate, doctor's server-side checks, and a
run started, claimed and finished through the commands."""

from __future__ import annotations

import json

import pytest

from treadle.tests.cli.helpers import Invoke, drive, one_error_line, started

pytestmark = pytest.mark.postgres


def test_commands_refuse_an_unmigrated_database_until_migrate(
    postgres_url: str, invoke: Invoke
) -> None:
    """Before migrate, start fails in one line asking for it and doctor fails the
    schema check; after migrate, doctor passes (including the clock-skew check against
    the server's now())."""
    line = one_error_line(invoke("start", "greeter", '{"name": "p"}', db=postgres_url))
    assert "treadle migrate" in line
    before = invoke("doctor", "--json", db=postgres_url, app=None)
    assert before.exit_code == 1
    checks = {c["name"]: c for c in json.loads(before.stdout)["checks"]}
    assert checks["connectivity"]["level"] == "ok"
    assert checks["schema"]["level"] == "FAIL"

    migrated = invoke("migrate", db=postgres_url, app=None)
    assert migrated.exit_code == 0, migrated.output
    after = invoke("doctor", "--json", db=postgres_url, app=None)
    assert after.exit_code == 0, after.output
    checks = {c["name"]: c for c in json.loads(after.stdout)["checks"]}
    assert checks["clock skew"]["level"] == "ok"
    assert checks["stale leases"]["level"] == "ok"


def test_start_tick_and_wait_on_postgres(postgres_url: str, invoke: Invoke) -> None:
    """A run started with the CLI is claimed by `tick` (its stage queued), `start --wait
    --local-worker` finishes another one, and a worker finishes the claimed one; `runs
    list` sees both. (The local worker of `start --wait` stops once its own run ends, so
    whether it also took the queued stage before then is a race, not asserted.)"""
    assert invoke("migrate", db=postgres_url, app=None).exit_code == 0
    first = started(invoke("start", "greeter", '{"name": "pg"}', db=postgres_url))
    ticked = invoke("tick", "--json", db=postgres_url)
    assert ticked.exit_code == 0, ticked.output
    claimed = json.loads(ticked.stdout)["steps"]["claim"]["result"]["claimed"]
    assert [c["workflow_run_id"] for c in claimed] == [first]
    waited = invoke(
        "start", "greeter", '{"name": "pg2"}', "--wait", "--local-worker", db=postgres_url
    )
    assert waited.exit_code == 0, waited.output
    assert "HELLO PG2!" in waited.stdout
    assert drive(postgres_url, first, {"COMPLETED", "FAILED"})["status"] == "COMPLETED"
    listed = json.loads(invoke("runs", "list", "--json", db=postgres_url, app=None).stdout)
    assert {r["status"] for r in listed} == {"COMPLETED"}
    assert len(listed) == 2
