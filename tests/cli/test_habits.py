"""CLI habits users bring from other tools: ``--version``, ``--db``/``--app`` after the
command, read-only commands that never create a database, and ``runs list`` filters
that match the API's (several statuses, search attributes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from treadle import __version__
from treadle.hosts.cli import build_app
from treadle.tests.cli.cliapp import APP
from treadle.tests.cli.helpers import Invoke, drive, one_error_line, started


def raw(*args: str) -> Result:
    """``treadle ARGS`` exactly as typed: no global options put in front."""
    return CliRunner().invoke(build_app(), list(args))


def test_version_prints_the_package_version() -> None:
    """`treadle --version` prints the version and exits 0, with no command and no database."""
    result = raw("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"treadle {__version__}"


def test_db_after_the_command_is_the_database(tmp_path: Path) -> None:
    """`treadle migrate --db URL` (what Engine.open's error message says to run) migrates
    that file, and `runs list --db URL` reads it."""
    url = f"sqlite:///{tmp_path / 'after.db'}"
    migrated = raw("migrate", "--db", url)
    assert migrated.exit_code == 0, migrated.output
    assert "upgraded from empty" in migrated.stdout
    assert (tmp_path / "after.db").is_file()
    listed = raw("runs", "list", "--db", url, "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == []


def test_app_and_db_after_the_command_start_and_show_a_run(tmp_path: Path) -> None:
    """`start --app m:wf --db URL ...` works, as does `runs show --db URL RUN`."""
    url = f"sqlite:///{tmp_path / 'start.db'}"
    run_id = started(raw("start", "--app", APP, "--db", url, "greeter", '{"name": "ada"}'))
    shown = raw("runs", "show", run_id, "--db", url, "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["input"] == {"name": "ada"}


def test_the_command_option_wins_over_the_global_one(tmp_path: Path) -> None:
    """Given on both sides, the option after the command is the one used."""
    good = f"sqlite:///{tmp_path / 'good.db'}"
    assert raw("migrate", "--db", good).exit_code == 0
    typo = f"sqlite:///{tmp_path / 'typo.db'}"
    result = raw("--db", typo, "runs", "list", "--db", good)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "typo.db").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("runs", "list"),
        ("runs", "show", "some-run"),
        ("events", "some-run"),
        ("signal", "some-run", "approve", '{"approved": true}'),
        ("cancel", "some-run"),
        ("rerun", "some-run", "greet"),
        ("fork", "some-run", "--from-step", "count"),
        ("query", "some-run", "phase"),
        ("update", "some-run", "rename", '{"name": "x"}'),
        ("review", "some-run", "--decision", "approve"),
        ("tick",),
    ],
    ids=lambda args: "-".join(a for a in args if not a.startswith(("{", "some"))),
)
def test_commands_on_existing_runs_never_create_a_database(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A mistyped SQLite path fails naming the file, and creates nothing (no empty
    database answering `0 run(s)`)."""
    url = f"sqlite:///{tmp_path / 'typo.db'}"
    line = one_error_line(raw("--db", url, "--app", APP, *args))
    assert "no SQLite database at" in line
    assert "typo.db" in line
    assert list(tmp_path.iterdir()) == []


def test_doctor_on_a_missing_file_fails_and_creates_nothing(tmp_path: Path) -> None:
    """doctor reports the missing file as a failed connectivity check, creating nothing."""
    result = raw("doctor", "--db", f"sqlite:///{tmp_path / 'typo.db'}")
    assert result.exit_code == 1
    assert "no SQLite database" in result.stdout
    assert list(tmp_path.iterdir()) == []


def _listed(invoke: Invoke, *args: str) -> set[str]:
    result = invoke("runs", "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return {run["id"] for run in json.loads(result.stdout)}


def test_runs_list_takes_several_statuses(db_url: str, invoke: Invoke) -> None:
    """--status repeats and takes commas: runs in any of the statuses are listed."""
    failed = started(invoke("start", "broken", '{"name": "f"}'))
    drive(db_url, failed, {"FAILED"})
    cancelled = started(invoke("start", "greeter", '{"name": "c"}'))
    assert invoke("cancel", cancelled).exit_code == 0
    pending = started(invoke("start", "greeter", '{"name": "p"}'))
    assert _listed(invoke, "--status", "FAILED", "--status", "cancelled") == {failed, cancelled}
    assert _listed(invoke, "--status", "failed,CANCELLED") == {failed, cancelled}
    assert _listed(invoke, "--status", "pending,failed") == {pending, failed}
    table = invoke("runs", "list", "--status", "FAILED", "--status", "CANCELLED")
    assert "2 matching: CANCELLED 1, FAILED 1" in table.stdout
    line = one_error_line(invoke("runs", "list", "--status", "failed,finished"))
    assert "--status: 'finished' is not a run status" in line


def test_runs_list_filters_on_search_attributes(db_url: str, invoke: Invoke) -> None:
    """--attr key=value matches search attributes: text as text, JSON literals as JSON,
    several --attr together."""
    from treadle.engine import Engine
    from treadle.tests.cli.cliapp import workflows

    async def start_runs() -> dict[str, str]:
        async with await Engine.open(db_url, workflows=workflows) as engine:
            ids = {}
            for label, attrs in {
                "gold": {"tier": "gold", "seats": 3},
                "gold-big": {"tier": "gold", "seats": 30},
                "silver": {"tier": "silver", "seats": 3, "vip": True},
                "digits": {"tier": "3"},
            }.items():
                handle = await engine.start("greeter", {"name": label}, search_attributes=attrs)
                ids[label] = handle.run_id
            return ids

    import asyncio

    ids = asyncio.run(start_runs())
    assert _listed(invoke, "--attr", "tier=gold") == {ids["gold"], ids["gold-big"]}
    assert _listed(invoke, "--attr", "tier=gold", "--attr", "seats=3") == {ids["gold"]}
    assert _listed(invoke, "--attr", "vip=true") == {ids["silver"]}
    assert _listed(invoke, "--attr", 'tier="3"') == {ids["digits"]}
    assert _listed(invoke, "--attr", "tier=3") == set()  # 3 is a number, stored "3" is text
    assert _listed(invoke, "--attr", "seats=3", "--status", "pending") == {
        ids["gold"],
        ids["silver"],
    }
    line = one_error_line(invoke("runs", "list", "--attr", "tier"))
    assert "--attr: 'tier' is not key=value" in line


@pytest.mark.postgres
def test_migrate_db_after_the_command_on_postgresql(postgres_url: str) -> None:
    """On an empty PostgreSQL database, commands refuse the schema and say to run
    `treadle migrate --db <url>`; running exactly that works, and then they do."""
    before = raw("runs", "list", "--db", postgres_url)
    assert "treadle migrate --db <url>" in one_error_line(before)
    migrated = raw("migrate", "--db", postgres_url)
    assert migrated.exit_code == 0, migrated.output
    after = raw("runs", "list", "--db", postgres_url, "--json")
    assert after.exit_code == 0, after.output
    assert json.loads(after.stdout) == []
