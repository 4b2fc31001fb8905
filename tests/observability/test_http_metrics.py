"""``GET /metrics`` of the HTTP app (``treadle serve --metrics``): the exposition parses,
it needs a token when the app has tokens, and an engine without telemetry says so."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("fastapi", reason="the server extra is not installed")

from treadle import Engine
from treadle.adapters.otel import METRIC_NAMES
from treadle.hosts.http import create_app
from treadle.hosts.http.auth import TokenAuth
from treadle.tests.observability.conftest import Otel
from treadle.tests.observability.otelapp import workflows

TREADLE = str(Path(sys.executable).with_name("treadle"))


async def test_metrics_route_serves_the_engines_metrics(otel: Otel) -> None:
    """After a run, /metrics parses and carries its counts and the storage gauges."""
    otel.telemetry.prometheus_registry = otel.registry
    engine = await Engine.open("memory://", workflows, telemetry=otel.telemetry)  # type: ignore[arg-type]
    async with engine, engine.worker(orchestration_interval=0.05, job_poll_interval=0.05):
        handle = await engine.start("relay", {"n": 1})
        assert await handle.result(timeout=20) == {"n": 20}
        app = create_app(engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        s.name: s
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples["treadle_runs_started_total"].labels["workflow"] == "relay"
    assert samples["treadle_runs_completed_total"].value == 1
    assert "treadle_queue_depth" in samples  # refreshed from storage by the scrape
    assert {n for n in METRIC_NAMES if n.startswith("treadle_outbox")} <= set(samples)


async def test_metrics_route_needs_a_token_and_telemetry(otel: Otel) -> None:
    """With tokens, no token is 401 and a read token is 200; no telemetry is a 404."""
    otel.telemetry.prometheus_registry = otel.registry
    auth = TokenAuth({"secret-read-token-0123456789abcdef": ("read",)})
    async with await Engine.open("memory://", workflows, telemetry=otel.telemetry) as engine:  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=create_app(engine, auth=auth))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/metrics")).status_code == 401
            headers = {"authorization": "Bearer secret-read-token-0123456789abcdef"}
            assert (await client.get("/metrics", headers=headers)).status_code == 200
    async with await Engine.open("memory://", workflows) as plain:  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=create_app(plain))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            off = await client.get("/metrics")
    assert off.status_code == 404
    assert "treadle serve --metrics" in off.text


def test_treadle_serve_metrics_as_a_process(treadle_sqlite_url: str, tmp_path: Path) -> None:
    """`treadle serve --metrics` answers /metrics with the exposition; SIGTERM stops it."""
    with socket.socket() as probe:  # a free port (the server binds it right after)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    argv = [TREADLE, "serve", "--metrics", "--port", str(port), "--db", treadle_sqlite_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TREADLE_OTEL"))}
    with log.open("wb") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError(log.read_text()) from None
                time.sleep(0.1)  # the process is starting: nothing to be told by
        assert response.status_code == 200, response.text
        names = {
            s.name
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }
        assert {"treadle_queue_depth", "treadle_outbox_lag_seconds"} <= names
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log.read_text()
