"""``treadle runs show`` and ``treadle events`` print a failed stage's traceback, shortened
to the user's frames (issue 13, item 12)."""

from __future__ import annotations

import json

from treadle.tests.cli.helpers import Invoke, drive, started

_FAILING_LINE = 'raise ValueError(f"cannot process {ctx.input.name}")'


def _failed_run(db_url: str, invoke: Invoke) -> str:
    run_id = started(invoke("start", "broken", '{"name": "bad"}'))
    drive(db_url, run_id, {"FAILED"})
    return run_id


def test_runs_show_prints_the_failed_stages_traceback(db_url: str, invoke: Invoke) -> None:
    """The traceback of the failed stage follows the timeline, pointing at the line of
    the stage body that raised, with no frame of Treadle's own."""
    run_id = _failed_run(db_url, invoke)
    result = invoke("runs", "show", run_id)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "traceback of stage 'explode' (attempt 1)" in out
    assert "cliapp.py" in out
    assert _FAILING_LINE in out
    assert "ValueError: cannot process bad" in out
    assert "treadle/kernel" not in out
    assert "/kernel/handlers" not in out


def test_runs_show_json_and_events_carry_the_traceback(db_url: str, invoke: Invoke) -> None:
    """``runs show --json`` has the stage's ``error_traceback``; ``events`` prints the
    traceback under the ``stage:failed`` line, and ``events --json`` has it as a field."""
    run_id = _failed_run(db_url, invoke)
    shown = json.loads(invoke("runs", "show", run_id, "--json").stdout)
    trace = shown["stages"][0]["error_traceback"]
    assert _FAILING_LINE in trace
    lines = invoke("events", run_id).stdout
    assert "stage:failed" in lines
    assert _FAILING_LINE in lines
    events = [json.loads(line) for line in invoke("events", run_id, "--json").stdout.splitlines()]
    [failed] = [e for e in events if e["type"] == "stage:failed"]
    assert failed["traceback"] == trace
