"""A code workflow survives SIGKILL of a real worker process, on SQLite and PostgreSQL
(issue 5, point 12).

``code_crash_app``'s three-step workflow records every step execution (pid, step,
attempt) in ``steps.log``. A worker process is killed with SIGKILL while step ``two`` is
in flight (the test waits for the marker file that step writes, polling with a deadline);
a second worker reaps the dead worker's lease and finishes the run. The journal makes
the resume exact: the step that completed before the kill does not run again, the step
in flight runs at most once more, the step after it runs once.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from treadle import Engine, RunStatus
from treadle.engine import RunHandle
from treadle.kernel.workflows import JournalStatus
from treadle.tests.reliability.processes import HERE, WAIT, WorkerProcess, wait_until

sys.path.insert(0, str(HERE))
import code_crash_app

pytestmark = pytest.mark.slow

APP = "code_crash_app:workflows"


def _spawn(workers: list[WorkerProcess], db: str, crash_dir: Path, name: str) -> WorkerProcess:
    worker = WorkerProcess(db, crash_dir, name, app=APP, stale_lease_threshold=1.0)
    workers.append(worker)
    return worker


def _start(db: str) -> str:
    async def go() -> str:
        async with await Engine.open(db, workflows=code_crash_app.workflows) as engine:
            return (await engine.start("three-steps", {"n": 1})).run_id

    return asyncio.run(go())


def _finished(db: str, run_id: str) -> tuple[Any, list[Any]]:
    """Wait for the run to end (any worker); the run and its journal."""

    async def go() -> tuple[Any, list[Any]]:
        async with await Engine.open(db, workflows=code_crash_app.workflows) as engine:
            await RunHandle(engine, run_id).result(timeout=WAIT)
            return await engine.get_run(run_id), await engine.journal(run_id)

    return asyncio.run(go())


def _executions(crash_dir: Path) -> list[tuple[int, str, int]]:
    lines = (crash_dir / "steps.log").read_text().splitlines()
    return [(int(pid), step, int(attempt)) for pid, step, attempt in map(str.split, lines)]


def test_sigkill_during_a_step_resumes_without_repeating_completed_steps(
    db: str, crash_dir: Path, workers: list[WorkerProcess]
) -> None:
    """SIGKILL while step two runs: a second worker finishes the run; step one ran once
    (in the killed process), step two at most twice, step three once (in the rescuer)."""
    run_id = _start(db)
    first = _spawn(workers, db, crash_dir, "w-killed")
    wait_until((crash_dir / "entered-two").exists, "step two to start", first)
    first.signal(signal.SIGKILL)
    assert first.exit_code() == -signal.SIGKILL
    second = _spawn(workers, db, crash_dir, "w-rescuer")
    run, journal = _finished(db, run_id)
    second.signal(signal.SIGTERM)
    assert second.exit_code() == 0

    assert run.status is RunStatus.COMPLETED
    assert run.output == [2, 20, 23]
    executions = _executions(crash_dir)
    steps = [step for _, step, _ in executions]
    assert steps.count("one") == 1
    assert 1 <= steps.count("two") <= 2
    assert steps.count("three") == 1
    by_step = {step: pid for pid, step, _ in executions}
    assert by_step["one"] == first.proc.pid
    assert executions[steps.index("two")][0] == first.proc.pid  # in flight when killed
    assert by_step["two"] == by_step["three"] == second.proc.pid
    assert [(e.name, e.status, e.result) for e in journal] == [
        ("one", JournalStatus.COMPLETED, 2),
        ("two", JournalStatus.COMPLETED, 20),
        ("three", JournalStatus.COMPLETED, 23),
    ]
