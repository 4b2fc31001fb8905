"""Real worker processes for the crash tests: ``WorkerProcess`` runs
``run_worker.py`` (``treadle.hosts.worker.main``) on a database with the app it is
given, its log in a file; ``wait_until`` polls a condition (a marker file, a log line)
with a deadline, never sleeping as synchronisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent

WAIT = 30.0
"""Upper bound on any single wait; each test takes a few seconds in practice."""


class WorkerProcess:
    """One ``hosts.worker.main`` process; its stderr (the structured log) goes to a file."""

    def __init__(
        self,
        db: str,
        crash_dir: Path,
        name: str,
        *,
        app: str = "crash_app:workflows",
        **options: Any,
    ) -> None:
        self.name = name
        self.log_path = crash_dir / f"{name}.log"
        kwargs = {
            "app": app,
            "db": db,
            "worker_id": name,
            "orchestration_interval": 0.1,
            "job_poll_interval": 0.05,
            **options,
        }
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "TREADLE_CRASH_DIR": str(crash_dir),
            "TREADLE_LOG_LEVEL": "INFO",
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "run_worker.py"), json.dumps(kwargs)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str) -> None:
        wait_until(lambda: text in self.log(), f"{self.name} to log {text!r}", self)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def exit_code(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"{self.name} did not exit within {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_until(predicate: Callable[[], bool], what: str, *workers: WorkerProcess) -> None:
    """Poll ``predicate`` (a marker file, a log line) until it holds, or fail with the
    workers' logs."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        for worker in workers:
            if worker.proc.poll() is not None and not predicate():
                pytest.fail(f"{worker.name} exited early waiting for {what}:\n{worker.log()}")
        if time.monotonic() > deadline:
            logs = "\n".join(w.log()[-3000:] for w in workers)
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.02)
