"""AI costs survive SIGKILL of a real worker process, on SQLite and PostgreSQL.

``ai_crash_app``'s workflow makes three model calls, each a journaled step. The worker is
killed while the second call is in flight (the test waits for the marker file the fake
model writes); a second worker reaps the dead worker's lease and finishes the run. The
first call is not made again, the second is made once more, and the run's totals are
exactly the sum of the three recorded calls: the killed request, never committed, is
neither counted nor recorded twice.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from treadle import Engine, RunStatus
from treadle.engine import RunHandle
from treadle.tests.reliability.processes import HERE, WAIT, WorkerProcess, wait_until

sys.path.insert(0, str(HERE))
import ai_crash_app

pytestmark = pytest.mark.slow

APP = "ai_crash_app:workflows"


def _spawn(workers: list[WorkerProcess], db: str, crash_dir: Path, name: str) -> WorkerProcess:
    worker = WorkerProcess(db, crash_dir, name, app=APP, stale_lease_threshold=1.0)
    workers.append(worker)
    return worker


def _start(db: str) -> str:
    async def go() -> str:
        async with await Engine.open(db, workflows=ai_crash_app.workflows) as engine:
            return (await engine.start("ai-three", {"n": 1})).run_id

    return asyncio.run(go())


def _finished(db: str, run_id: str) -> tuple[Any, list[Any]]:
    async def go() -> tuple[Any, list[Any]]:
        async with await Engine.open(db, workflows=ai_crash_app.workflows) as engine:
            await RunHandle(engine, run_id).result(timeout=WAIT)
            return await engine.get_run(run_id), await engine.ai_calls(run_id)

    return asyncio.run(go())


def test_sigkill_during_a_model_call_keeps_totals_exact(
    db: str, crash_dir: Path, workers: list[WorkerProcess]
) -> None:
    """SIGKILL while the second call is in flight: the rescuer makes it again, the first
    is not repeated, and total_cost and total_tokens are the sums of the recorded calls."""
    run_id = _start(db)
    first = _spawn(workers, db, crash_dir, "w-killed")
    wait_until((crash_dir / "entered-two").exists, "the second model call", first)
    first.signal(signal.SIGKILL)
    assert first.exit_code() == -signal.SIGKILL
    second = _spawn(workers, db, crash_dir, "w-rescuer")
    run, calls = _finished(db, run_id)
    second.signal(signal.SIGTERM)
    assert second.exit_code() == 0

    assert run.status is RunStatus.COMPLETED
    assert run.output == ["answer to one", "answer to two", "answer to three"]
    requests = [line.split() for line in (crash_dir / "requests.log").read_text().splitlines()]
    prompts = [prompt for _, prompt in requests]
    # Exactly this on a quiet machine: one, two (killed), two, three. A worker starved of
    # CPU for longer than its 1 s lease threshold may have an execution reaped and run
    # again (at least once): the duplicate's calls are then recorded as a failed attempt.
    assert prompts[:3] == ["one", "two", "two"]
    assert prompts.count("one") == 1  # committed before the kill: never asked again
    assert int(requests[0][0]) == int(requests[1][0]) == first.proc.pid
    assert int(requests[2][0]) == second.proc.pid
    kept = [(c.step, c.failed_attempt) for c in calls if not c.failed_attempt]
    assert kept == [("one#1", False), ("two#1", False), ("three#1", False)]
    assert len(calls) == len(prompts) - 1  # every request but the killed one is recorded
    assert all(c.cost is not None and c.cost > 0 for c in calls)
    assert run.total_cost == sum((c.cost or Decimal(0) for c in calls), Decimal(0))
    assert run.total_tokens == sum(c.input_tokens + c.output_tokens for c in calls)
