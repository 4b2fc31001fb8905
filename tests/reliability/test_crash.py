"""Crash tests with real worker processes, on SQLite and PostgreSQL (issue 4, point 8).

Each test runs ``treadle.hosts.worker.main`` in subprocesses on a shared database with
``crash_app``'s workflows, whose first ``slow`` attempt blocks until the test allows it
(see that module). The tests synchronise on marker files the stages write and on the
worker's own log lines, never on sleeps:

- SIGKILL in the middle of a stage: a second worker takes the job over once the lease
  expires, and the stage's result is committed exactly once;
- SIGTERM in the middle of a stage: the stage finishes within ``drain_timeout`` and
  the process exits 0;
- SIGTERM with a tiny ``drain_timeout``: the job is released at once (no lease expiry)
  and another worker completes it; a sync stage stuck in its thread does not keep the
  process alive;
- a second signal ends the drain at once.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from treadle import Engine
from treadle.engine import RunHandle
from treadle.tests.reliability.processes import HERE, WAIT, WorkerProcess, wait_until

sys.path.insert(0, str(HERE))
import crash_app

pytestmark = pytest.mark.slow


def _spawn(
    workers: list[WorkerProcess], db: str, crash_dir: Path, name: str, **options: Any
) -> WorkerProcess:
    worker = WorkerProcess(db, crash_dir, name, **options)
    workers.append(worker)
    return worker


def _start_run(db: str, workflow: str) -> str:
    async def go() -> str:
        async with await Engine.open(db, workflows=crash_app.workflows) as engine:
            return (await engine.start(workflow, {"name": "doc-1"})).run_id

    return asyncio.run(go())


def _finished_run(db: str, run_id: str) -> tuple[Any, list[Any]]:
    """Wait for the run to complete (any worker); the run and its events."""

    async def go() -> tuple[Any, list[Any]]:
        async with await Engine.open(db, workflows=crash_app.workflows) as engine:
            await RunHandle(engine, run_id).result(timeout=WAIT)
            assert engine.backend is not None
            async with engine.backend.persistence.transaction() as tx:
                events = list(await tx.outbox.events_for_run(run_id))
            return await engine.get_run(run_id), events

    return asyncio.run(go())


def _attempts(crash_dir: Path) -> list[str]:
    return (crash_dir / "attempts.log").read_text().split("\n")[:-1]


def _stage_events(events: list[Any], stage_id: str) -> list[tuple[str, int | None]]:
    return [
        (e.type, getattr(e, "attempt", None))
        for e in events
        if getattr(e, "stage_id", None) == stage_id
        and e.type in ("stage:started", "stage:failed", "stage:completed")
    ]


@pytest.mark.parametrize("workflow", ["crash-async", "crash-sync"])
def test_sigkill_mid_stage_another_worker_finishes_after_the_lease_expires(
    db: str, crash_dir: Path, workers: list[WorkerProcess], workflow: str
) -> None:
    """A worker killed with SIGKILL inside a long stage leaves its lease to expire; a second
    worker reaps it, runs the stage's second attempt and completes the run, and the
    stage's result is committed exactly once."""
    stage = "slow" if workflow == "crash-async" else "slow-sync"
    run_id = _start_run(db, workflow)
    first = _spawn(workers, db, crash_dir, "w-killed", stale_lease_threshold=1.0)
    wait_until((crash_dir / f"entered-{stage}-1").exists, "the first attempt", first)
    first.signal(signal.SIGKILL)
    assert first.exit_code() == -signal.SIGKILL
    second = _spawn(workers, db, crash_dir, "w-rescuer", stale_lease_threshold=1.0)
    run, events = _finished_run(db, run_id)
    second.signal(signal.SIGTERM)
    assert second.exit_code() == 0
    assert run.output == {"name": "doc-1", "attempt": 2}
    assert _attempts(crash_dir) == [f"{stage} 1", f"{stage} 2", "finish 1"]
    assert _stage_events(events, stage) == [
        ("stage:started", 1),
        ("stage:failed", 1),
        ("stage:started", 2),
        ("stage:completed", 2),
    ]
    (reaped,) = [e for e in events if e.type == "stage:failed"]
    assert "lease expired" in reaped.error
    assert "w-killed" in reaped.error
    assert reaped.will_retry
    started = [e for e in events if e.type == "stage:started" and e.stage_id == stage]
    assert [e.worker_id for e in started] == ["w-killed", "w-rescuer"]
    assert [e.type for e in events].count("stage:completed") == 2  # slow + finish, once each


def test_sigterm_lets_the_running_stage_finish_and_exits_zero(
    db: str, crash_dir: Path, workers: list[WorkerProcess]
) -> None:
    """SIGTERM mid-stage: the worker stops taking work but the stage runs on and commits
    within drain_timeout; the process exits 0; the next group waits for another worker."""
    run_id = _start_run(db, "crash-async")
    worker = _spawn(workers, db, crash_dir, "w-drained", drain_timeout=20.0)
    wait_until((crash_dir / "entered-slow-1").exists, "the first attempt", worker)
    worker.signal(signal.SIGTERM)
    worker.wait_for_log("worker.draining")
    assert worker.proc.poll() is None  # still draining: the stage has not been told to end
    (crash_dir / "go").touch()
    assert worker.exit_code() == 0
    assert "job.released" not in worker.log()
    assert _attempts(crash_dir) == ["slow 1"]  # the stopping worker started nothing new
    successor = _spawn(workers, db, crash_dir, "w-next")
    run, events = _finished_run(db, run_id)
    successor.signal(signal.SIGTERM)
    assert successor.exit_code() == 0
    assert run.output == {"name": "doc-1", "attempt": 1}
    assert _stage_events(events, "slow") == [("stage:started", 1), ("stage:completed", 1)]
    assert _attempts(crash_dir) == ["slow 1", "finish 1"]


@pytest.mark.parametrize("workflow", ["crash-async", "crash-sync"])
def test_sigterm_past_the_drain_timeout_releases_the_job(
    db: str, crash_dir: Path, workers: list[WorkerProcess], workflow: str
) -> None:
    """With a tiny drain_timeout the stage is cut off and its job released at once, so a
    worker with a 60 s stale-lease threshold takes it over immediately; a sync stage
    still spinning in its thread does not keep the process from exiting 0."""
    stage = "slow" if workflow == "crash-async" else "slow-sync"
    run_id = _start_run(db, workflow)
    worker = _spawn(workers, db, crash_dir, "w-released", drain_timeout=0.2)
    wait_until((crash_dir / f"entered-{stage}-1").exists, "the first attempt", worker)
    worker.signal(signal.SIGTERM)
    assert worker.exit_code(timeout=15) == 0
    assert "job.released" in worker.log()
    successor = _spawn(workers, db, crash_dir, "w-successor", stale_lease_threshold=60.0)
    run, events = _finished_run(db, run_id)
    successor.signal(signal.SIGTERM)
    assert successor.exit_code() == 0
    # The shutdown refunded the attempt: the successor runs attempt 1 again.
    assert run.output == {"name": "doc-1", "attempt": 1}
    assert _stage_events(events, stage) == [
        ("stage:started", 1),
        ("stage:failed", 1),
        ("stage:started", 1),
        ("stage:completed", 1),
    ]
    (released,) = [e for e in events if e.type == "stage:failed"]
    assert released.error.startswith("released: worker 'w-released'")


def test_second_signal_exits_at_once(
    sqlite_db: str, crash_dir: Path, workers: list[WorkerProcess]
) -> None:
    """A second SIGTERM during a long drain ends it now: the process exits 143 and the
    job it was running is released, not left leased."""
    run_id = _start_run(sqlite_db, "crash-async")
    worker = _spawn(workers, sqlite_db, crash_dir, "w-impatient", drain_timeout=30.0)
    wait_until((crash_dir / "entered-slow-1").exists, "the first attempt", worker)
    worker.signal(signal.SIGTERM)
    worker.wait_for_log("worker.draining")
    began = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.exit_code(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - began < 5
    assert "worker.forced_stop" in worker.log()
    assert "job.released" in worker.log()
    successor = _spawn(workers, sqlite_db, crash_dir, "w-after", stale_lease_threshold=60.0)
    run, _ = _finished_run(sqlite_db, run_id)
    successor.signal(signal.SIGTERM)
    assert successor.exit_code() == 0
    assert run.output == {"name": "doc-1", "attempt": 1}  # the release refunded attempt 1
