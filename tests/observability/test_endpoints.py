"""``treadle worker --metrics-port --health-port``: /metrics parses, /healthz and /readyz
answer, and /readyz fails when the database is gone or its schema is old."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from treadle import Engine, RunFailedError
from treadle.adapters.otel import METRIC_NAMES
from treadle.adapters.sql.migrate import VERSION_TABLE
from treadle.hosts.probes import healthz_route
from treadle.hosts.worker import WorkerHost
from treadle.tests.observability.otelapp import workflows

# Series a worker process reports itself (run starts and cancels count where they are
# committed: here, in the test's own engine).
WORKER_SERIES = set(METRIC_NAMES) - {
    "treadle_runs_started_total",
    "treadle_runs_cancelled_total",
    "treadle_step_duration_seconds",
}


async def _serving(host: WorkerHost) -> asyncio.Task[int]:
    task = asyncio.ensure_future(host.serve())
    for _ in range(500):
        if len(host.ports_bound) == 2 or task.done():
            break
        await asyncio.sleep(0.01)
    assert len(host.ports_bound) == 2, task.result() if task.done() else host.ports_bound
    return task


def _families(text: str) -> dict[str, Any]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            base = sample.name
            for suffix in ("_bucket", "_count", "_sum", "_created"):
                if base.endswith(suffix) and family.type == "histogram":
                    base = base.removesuffix(suffix)
            found.setdefault(base, []).append(sample)
    return found


async def test_worker_endpoints(treadle_sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics of the work the worker did, parsed by prometheus_client; probes answer."""
    monkeypatch.delenv("TREADLE_OTEL", raising=False)
    host = WorkerHost(
        workflows,  # type: ignore[arg-type]
        db=treadle_sqlite_url,
        options={"orchestration_interval": 0.1, "job_poll_interval": 0.05},
        metrics_port=0,
        health_port=0,
        worker_id="metrics-worker",
    )
    task = await _serving(host)
    base = f"http://127.0.0.1:{host.ports_bound['health']}"
    metrics_url = f"http://127.0.0.1:{host.ports_bound['metrics']}/metrics"
    try:
        async with await Engine.open(treadle_sqlite_url, workflows) as engine:  # type: ignore[arg-type]
            handle = await engine.start("relay", {"n": 1}, run_id="relay-1")
            assert await handle.result(timeout=20) == {"n": 20}
            bad = await engine.start("broken", {"n": 1})
            with pytest.raises(RunFailedError):
                await bad.result(timeout=20)
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(100):  # the worker's first tick reports the lease reaper
                text = (await client.get(metrics_url)).text
                if "treadle_lease_expiries_total" in text:
                    break
                await asyncio.sleep(0.05)
            scraped = await client.get(metrics_url)
            assert scraped.status_code == 200
            assert scraped.headers["content-type"].startswith("text/plain")
            families = _families(scraped.text)
            assert set(WORKER_SERIES) <= set(families), set(WORKER_SERIES) - set(families)
            # Low cardinality: no run or job id among the labels (otel_scope_*: constant).
            labels = {k for ss in families.values() for s in ss for k in s.labels}
            labels = {k for k in labels if not k.startswith("otel_scope_")}
            assert labels <= {"workflow", "stage", "outcome", "kind", "queue", "status", "le"}

            samples = [s for ss in families.values() for s in ss]

            def value(name: str, **labels: str) -> float:
                return sum(
                    s.value
                    for s in samples
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
                )

            assert value("treadle_runs_completed_total", workflow="relay") == 1
            assert value("treadle_runs_failed_total", workflow="broken") == 1
            assert value("treadle_retries_total", workflow="broken", kind="stage") == 1
            assert value("treadle_stage_duration_seconds_count", stage="first") == 1
            assert value("treadle_worker_slots") == host.options.concurrency
            assert value("treadle_outbox_dead_letters") == 0

            health = await client.get(f"{base}/healthz")
            assert health.status_code == 200, health.text
            assert health.json()["status"] == "ok"
            ready = await client.get(f"{base}/readyz")
            assert ready.status_code == 200, ready.text
            assert (await client.get(f"{base}/nothing")).status_code == 404

            # An old schema: the probe names the revision and the fix.
            path = treadle_sqlite_url.removeprefix("sqlite:///")
            # In a thread: the worker shares this event loop and may hold the write lock.
            head = await asyncio.to_thread(_set_revision, path, "0007")
            old = await client.get(f"{base}/readyz")
            assert old.status_code == 503
            assert "treadle migrate" in old.json()["reason"]
            await asyncio.to_thread(_set_revision, path, head)
            assert (await client.get(f"{base}/readyz")).status_code == 200
            # The database gone.
            os.rename(path, path + ".away")
            gone = await client.get(f"{base}/readyz")
            assert gone.status_code == 503
            assert "unreachable" in gone.json()["reason"]
            os.rename(path + ".away", path)
    finally:
        host.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


def _set_revision(path: str, revision: str) -> str:
    """Set the schema revision the database claims; returns the one it had."""
    with sqlite3.connect(path, timeout=30) as conn:
        (before,) = conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()
        conn.execute(f"UPDATE {VERSION_TABLE} SET version_num = ?", (revision,))
    return str(before)


class _Stub:
    def __init__(self, alive: bool, last_tick_at: float | None) -> None:
        self.loops_alive = alive
        self.last_tick_at = last_tick_at
        self.in_flight = 0


async def test_healthz_fails_when_the_loops_stop_or_the_tick_is_old() -> None:
    """A stopped loop, or a last tick older than the timeout, answers 503."""
    import time

    now = time.monotonic()
    ok = await healthz_route(_Stub(True, now), 30)()
    stopped = await healthz_route(_Stub(False, now), 30)()
    stale = await healthz_route(_Stub(True, now - 31), 30)()
    never = await healthz_route(_Stub(True, None), 30)()
    assert [r[0] for r in (ok, stopped, stale, never)] == [200, 503, 503, 503]
    assert b"last tick too old" in stale[2]
