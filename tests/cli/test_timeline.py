"""``runs show``'s timeline after a rerun: stages kept from before the rerun started
before the run's (restarted) clock, and their offsets must still read forward."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from rich.console import Console

from treadle.hosts.cli.render import stage_timeline
from treadle.kernel.model import Run, RunStatus, StageRun, StageStatus
from treadle.tests.cli.helpers import Invoke, drive, started

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _rendered(run: Run) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(stage_timeline(run))
    return console.export_text()


def test_kept_stages_start_at_the_earliest_start_not_at_the_rerun() -> None:
    """A stage that started 109 s before the rerun restarted the run shows +0ms, the rerun
    stage +109.0s; no offset is negative."""
    rerun_at = T0 + timedelta(seconds=109)
    run = Run(
        id="r",
        workflow_id="wf",
        status=RunStatus.COMPLETED,
        created_at=T0,
        updated_at=rerun_at,
        started_at=rerun_at,
        completed_at=rerun_at + timedelta(seconds=1),
        stages=[
            StageRun(
                workflow_run_id="r",
                stage_id="kept",
                execution_group=0,
                status=StageStatus.COMPLETED,
                attempt=1,
                started_at=T0,
                completed_at=T0 + timedelta(seconds=2),
            ),
            StageRun(
                workflow_run_id="r",
                stage_id="again",
                execution_group=1,
                status=StageStatus.COMPLETED,
                attempt=1,
                started_at=rerun_at,
                completed_at=rerun_at + timedelta(seconds=1),
            ),
        ],
    )
    text = _rendered(run)
    assert "+-" not in text
    kept = next(line for line in text.splitlines() if " kept " in line)
    again = next(line for line in text.splitlines() if " again " in line)
    assert "+0ms" in kept
    assert "+109.0s" in again


def test_runs_show_after_a_rerun_has_no_negative_offsets(db_url: str, invoke: Invoke) -> None:
    """End to end: complete, rerun from the second stage, complete again; every start
    offset in runs show is forward from the run's first stage."""
    run_id = started(invoke("start", "greeter", '{"name": "t"}'))
    drive(db_url, run_id, {"COMPLETED"})
    assert invoke("rerun", run_id, "shout").exit_code == 0
    drive(db_url, run_id, {"COMPLETED"})
    shown = invoke("runs", "show", run_id)
    assert shown.exit_code == 0, shown.output
    assert "+-" not in shown.stdout
    greet = next(line for line in shown.stdout.splitlines() if " greet " in line)
    assert "+0ms" in greet
