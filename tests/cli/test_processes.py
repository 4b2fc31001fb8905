"""``treadle demo`` end to end (the main job), and the real ``treadle`` console script
in a child process: ``treadle worker`` serving runs until SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from treadle.tests.cli.cliapp import APP
from treadle.tests.cli.helpers import Invoke, started, wait_terminal

TREADLE = str(Path(sys.executable).with_name("treadle"))


def test_demo_runs_the_example_pipeline_to_completion(tmp_path: Path, invoke: Invoke) -> None:
    """`treadle demo` completes all three runs in under 30 s, prints their results and
    the retry / suspension / parallelism it saw, and the stored runs agree."""
    db = tmp_path / "demo.db"
    done = invoke("demo", "--file", str(db), app=None)
    assert done.exit_code == 0, done.output
    out = done.stdout
    took = re.search(r"3/3 runs completed in ([\d.]+)s", out)
    assert took is not None, out
    assert float(took.group(1)) < 30
    for label in ("positive", "negative", "neutral", "keywords x2", "5/5 stages"):
        assert label in out
    assert "keywords failed its first attempt and succeeded after backoff in 3/3 runs" in out
    assert "translate suspended 3x and resumed" in out
    assert "overlapped in time in 3/3 runs" in out
    assert f"kept in {db}" in out  # --file: the database stays, and the demo says where
    listed = invoke("runs", "list", "--json", db=f"sqlite:///{db}", app=None)
    runs = json.loads(listed.stdout)
    assert [r["status"] for r in runs] == ["COMPLETED"] * 3
    assert {r["output"]["label"] for r in runs} == {"positive", "negative", "neutral"}


def test_demo_fails_when_runs_do_not_finish_in_time(invoke: Invoke) -> None:
    """A demo that cannot finish within --timeout exits 1 with one line, not a hang."""
    result = invoke("demo", "--timeout", "1", app=None)
    assert result.exit_code == 1
    assert "timed out after 1s" in result.stderr


def test_demo_does_not_offer_a_temporary_database_to_inspect(invoke: Invoke) -> None:
    """Without --file the demo's database is deleted on exit: the demo says so, and
    prints no path or command to look at it afterwards."""
    done = invoke("demo", app=None)
    assert done.exit_code == 0, done.output
    first = done.stdout.splitlines()[0]
    assert "temporary file, deleted on exit (--file PATH keeps it)" in first
    assert ".db" not in done.stdout
    assert "runs list" not in done.stdout


def test_console_script_is_installed() -> None:
    """The `treadle` console script runs the CLI (pyproject's entry point)."""
    done = subprocess.run([TREADLE, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout


def test_worker_serves_runs_and_drains_on_sigterm(db_url: str, invoke: Invoke) -> None:
    """`treadle worker` executes a run started by `treadle start`, then exits 0 after
    SIGTERM."""
    assert invoke("migrate", app=None).exit_code == 0
    worker = subprocess.Popen(
        [
            TREADLE, "--db", db_url, "--app", APP, "worker",
            "--orchestration-interval", "0.05", "--job-poll-interval", "0.02",
            "--drain-timeout", "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        run_id = started(invoke("start", "greeter", '{"name": "w"}'))
        output = wait_terminal(db_url, run_id)
        assert output["text"].startswith("HELLO W!"), output
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr


def test_a_stage_raising_keyboard_interrupt_fails_its_run_not_the_worker(
    db_url: str, invoke: Invoke
) -> None:
    """KeyboardInterrupt from an async and a sync stage body fails that run with an error
    naming it (and a log line naming the run and stage); the same `treadle worker` then
    serves another run and still drains and exits 0 on SIGTERM."""
    assert invoke("migrate", app=None).exit_code == 0
    worker = subprocess.Popen(
        [
            TREADLE, "--db", db_url, "--app", APP, "worker",
            "--orchestration-interval", "0.05", "--job-poll-interval", "0.02",
            "--drain-timeout", "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        failed = []
        for workflow_id in ("interrupter", "interrupter-sync"):
            run_id = started(invoke("start", workflow_id, "{}"))
            outcome = wait_terminal(db_url, run_id)
            assert "KeyboardInterrupt" in str(outcome), outcome
            failed.append(run_id)
        ok = started(invoke("start", "greeter", '{"name": "after"}'))
        assert wait_terminal(db_url, ok)["text"].startswith("HELLO AFTER!")
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr
    for run_id in failed:
        named = [line for line in stderr.splitlines() if run_id in line and "Interrupt" in line]
        assert named, stderr


def test_worker_without_an_app_exits_with_the_config_code(invoke: Invoke) -> None:
    """`treadle worker` with no --app says so in one line and exits 2."""
    result = invoke("worker", app=None)
    assert result.exit_code == 2
    assert "--app" in result.stderr


def test_worker_serves_only_its_queues_and_doctor_names_the_unserved_one(
    db_url: str, invoke: Invoke
) -> None:
    """`treadle worker --queue other` claims a run started by `treadle start` but does not
    run its stage (on the default queue): doctor warns that `default` has a due job and no
    live worker, and names the worker seen; a default worker then finishes the run."""
    import time

    assert invoke("migrate", app=None).exit_code == 0
    cmd = [
        TREADLE, "--db", db_url, "--app", APP, "worker",
        "--orchestration-interval", "0.05", "--job-poll-interval", "0.02",
        "--drain-timeout", "5",
    ]  # fmt: skip
    other = subprocess.Popen(
        [*cmd, "--queue", "other", "--worker-id", "other-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = started(invoke("start", "greeter", '{"name": "q"}'))
        deadline = time.monotonic() + 20
        while True:  # polls what the worker stores (its claim queues the stage)
            checks = {
                c["name"]: c
                for c in json.loads(invoke("doctor", "--json", app=None).stdout)["checks"]
            }
            if checks["queues"]["level"] == "warn" or time.monotonic() > deadline:
                break
        assert checks["queues"]["level"] == "warn", checks["queues"]
        assert "default (1 due)" in checks["queues"]["detail"]
        default = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_terminal(db_url, run_id)["text"].startswith("HELLO Q!")
        finally:
            default.send_signal(signal.SIGTERM)
            default.communicate(timeout=30)
    finally:
        other.send_signal(signal.SIGTERM)
        _, stderr = other.communicate(timeout=30)
    assert other.returncode == 0, stderr
    starters = [e.worker_id for e in _events(db_url, run_id) if e.type == "stage:started"]
    assert starters  # every stage started by the default worker, none by other-1
    assert "other-1" not in starters


def _events(db_url: str, run_id: str) -> list[Any]:
    import asyncio

    from treadle.engine import Engine

    async def go() -> list[Any]:
        async with await Engine.open(db_url) as engine:
            return [event async for event in engine.events(run_id)]

    return asyncio.run(go())


def test_worker_rejects_a_bad_queue_name(invoke: Invoke) -> None:
    """A queue name with a space is a configuration error (exit 2) naming the problem."""
    result = invoke("worker", "--queue", "not ok")
    assert result.exit_code == 2
    assert "queue must be" in result.stderr
