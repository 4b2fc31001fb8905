"""Assertions and waits shared by the CLI tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from typer.testing import Result

from treadle.tests.cli.cliapp import workflows

UNREACHABLE_PG = "postgresql+psycopg://nobody@127.0.0.1:1/none"
"""Port 1 refuses connections at once: an unreachable database without a timeout."""

Invoke = Callable[..., Result]


def one_error_line(result: Result) -> str:
    """The single stderr line of a failed command (asserts there is exactly one, and no
    traceback)."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def started(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def show_json(invoke: Invoke, run_id: str) -> dict[str, Any]:
    result = invoke("runs", "show", run_id, "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_terminal(db_url: str, run_id: str, timeout: float = 20.0) -> Any:
    """Block until the run is terminal (``RunHandle.result`` polls storage)."""
    from treadle.engine import Engine

    async def go() -> Any:
        async with await Engine.open(db_url, workflows=workflows) as engine:
            try:
                return await engine.handle(run_id).result(timeout=timeout)
            except Exception as exc:
                return exc

    return asyncio.run(go())


def drive(db_url: str, run_id: str, until: set[str], timeout: float = 20.0) -> dict[str, Any]:
    """Run an in-process worker until the run's status is in ``until``; the run as JSON.

    Polls storage for the status (the condition), bounded by ``timeout``."""
    from treadle.engine import Engine

    async def go() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        engine = await Engine.open(db_url, workflows=workflows)
        async with engine, engine.worker(orchestration_interval=0.05, job_poll_interval=0.02):
            while True:
                run = await engine.get_run(run_id)
                if run.status.value in until:
                    return run.model_dump(mode="json")
                if loop.time() > deadline:
                    raise AssertionError(f"run {run_id} still {run.status.value}")
                await asyncio.sleep(0.02)

    return asyncio.run(go())
