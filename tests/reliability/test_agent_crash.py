"""A durable pydantic-ai agent survives SIGKILL of a real worker process between two
tool calls, on SQLite and PostgreSQL (issue 17, item 3).

``agent_crash_app``'s agent asks its model for ``lookup``, then ``charge``, then answers;
each model invocation and tool execution is logged with its process id. The worker is
killed with SIGKILL while ``charge`` runs (after ``lookup`` and two model requests
committed as journaled steps); a second worker reaps the lease and finishes the run. The
model is invoked three times in all (the rescuer asks only the third question), and
``lookup`` runs once.
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
from treadle.tests.reliability.processes import HERE, WAIT, WorkerProcess, wait_until

pytest.importorskip("pydantic_ai")
sys.path.insert(0, str(HERE))
import agent_crash_app

pytestmark = pytest.mark.slow

APP = "agent_crash_app:workflows"


def _start(db: str) -> str:
    async def go() -> str:
        async with await Engine.open(db, workflows=agent_crash_app.workflows) as engine:
            return (await engine.start("shop-agent", {"prompt": "buy A-1"})).run_id

    return asyncio.run(go())


def _finished(db: str, run_id: str) -> tuple[Any, list[Any]]:
    async def go() -> tuple[Any, list[Any]]:
        async with await Engine.open(db, workflows=agent_crash_app.workflows) as engine:
            await RunHandle(engine, run_id).result(timeout=WAIT)
            return await engine.get_run(run_id), await engine.journal(run_id)

    return asyncio.run(go())


def test_sigkill_between_tool_calls_resumes_without_a_repeated_model_call(
    db: str, crash_dir: Path, workers: list[WorkerProcess]
) -> None:
    """SIGKILL while the second tool runs: the rescuer finishes the agent run; the model
    ran twice in the killed process and once in the rescuer, ``lookup`` once."""
    run_id = _start(db)
    first = WorkerProcess(db, crash_dir, "w-killed", app=APP, stale_lease_threshold=1.0)
    workers.append(first)
    wait_until((crash_dir / "entered-charge").exists, "charge to start", first)
    first.signal(signal.SIGKILL)
    assert first.exit_code() == -signal.SIGKILL
    second = WorkerProcess(db, crash_dir, "w-rescuer", app=APP, stale_lease_threshold=1.0)
    workers.append(second)
    run, journal = _finished(db, run_id)
    second.signal(signal.SIGTERM)
    assert second.exit_code() == 0

    assert run.status is RunStatus.COMPLETED
    assert run.output == "done: charged 42"
    calls = [line.split() for line in (crash_dir / "calls.log").read_text().splitlines()]
    pid = {"w-killed": first.proc.pid, "w-rescuer": second.proc.pid}
    assert [(int(p), what) for p, what in calls] == [
        (pid["w-killed"], "model"),
        (pid["w-killed"], "lookup"),
        (pid["w-killed"], "model"),
        (pid["w-killed"], "charge"),
        (pid["w-rescuer"], "charge"),
        (pid["w-rescuer"], "model"),
    ]
    assert [e.name for e in journal] == [
        "shop__model.request",
        "shop__function_toolset__<agent>.call_tool:lookup",
        "shop__model.request",
        "shop__function_toolset__<agent>.call_tool:charge",
        "shop__model.request",
    ]
