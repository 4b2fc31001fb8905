"""``treadle serve`` as a real process: it answers /healthz and the API on a free port,
shuts down cleanly on SIGTERM, and refuses an open non-loopback bind."""

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
from typer.testing import CliRunner

from treadle.hosts.cli import build_app
from treadle.hosts.cli.serve import is_loopback
from treadle.tests.http.conftest import ACT

APP = "treadle.tests.http.workflows:WORKFLOWS"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def treadle(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from treadle.hosts.cli import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_healthy(base: str, process: subprocess.Popen[str], deadline: float = 30.0) -> None:
    """Poll /healthz until the process answers (it is another process: no event to wait on)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(
                f"serve exited early: {process.stdout.read() if process.stdout else ''}"
            )
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not answer /healthz in time")


def test_serve_answers_healthz_and_the_api_then_stops_on_sigterm(tmp_path: Path) -> None:
    """A real ``treadle serve --worker`` with a token file answers /healthz without a
    token, runs a workflow started over HTTP, refuses a request without a token, and
    exits 0 after SIGTERM."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"act:{ACT}\n")
    port = free_port()
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    process = treadle(
        "serve", "--db", db, "--app", APP, "--worker", "--port", str(port),
        "--host", "0.0.0.0", "--token-file", str(tokens),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process)
        headers = {"Authorization": f"Bearer {ACT}"}
        assert httpx.get(f"{base}/api/v1/runs").status_code == 401
        started = httpx.post(
            f"{base}/api/v1/runs",
            json={"workflow_id": "checkout", "input": {"item": "pen"}},
            headers=headers,
        )
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]
        reply = httpx.post(
            f"{base}/api/v1/runs/{run_id}/update",
            json={"name": "ping", "payload": 1, "timeout": 20},
            headers=headers,
            timeout=30,
        )
        assert reply.json() == {"reply": {"pong": 1}}
        assert httpx.get(f"{base}/readyz").json()["status"] == "ok"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, out


@pytest.fixture
def runner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TREADLE_API_TOKENS", raising=False)


@pytest.mark.usefixtures("runner_env")
def test_serve_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    """``--host 0.0.0.0`` with no token file and no TREADLE_API_TOKENS exits 2 before
    binding, saying why; a malformed token file too."""
    db = f"sqlite:///{tmp_path / 'x.db'}"
    result = CliRunner().invoke(build_app(), ["serve", "--db", db, "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "refusing to serve on '0.0.0.0' without a token" in result.output
    bad = tmp_path / "tokens"
    bad.write_text("just-a-token-without-scope\n")
    result = CliRunner().invoke(build_app(), ["serve", "--db", db, "--token-file", str(bad)])
    assert result.exit_code == 2
    assert "expected 'scope:token'" in result.output
    result = CliRunner().invoke(build_app(), ["serve", "--db", db, "--worker"])
    assert result.exit_code == 2
    assert "--worker needs the app" in result.output


def test_loopback_addresses() -> None:
    """Only loopback addresses count as private."""
    assert all(map(is_loopback, ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com", ""]))


def test_serve_streams_events_and_stops_with_a_stream_open(tmp_path: Path) -> None:
    """Over a real socket an SSE client receives a run's events as they commit, and
    SIGTERM with that stream still open ends it and exits 0 promptly (no hang on the
    open connection)."""
    port = free_port()
    db = f"sqlite:///{tmp_path / 'sse.db'}"
    process = treadle("serve", "--db", db, "--app", APP, "--worker", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process)
        with httpx.Client(base_url=base, timeout=30) as client:
            sse = {"Accept": "text/event-stream"}
            with client.stream(
                "GET", "/api/v1/events?type=workflow:created", headers=sse
            ) as stream:
                started = client.post(
                    "/api/v1/runs", json={"workflow_id": "shout", "input": {"item": "x"}}
                )
                run_id = started.json()["run_id"]
                data = next(line for line in stream.iter_lines() if line.startswith("data: "))
                assert run_id in data
                process.send_signal(signal.SIGTERM)
                stopped = time.monotonic()
                out, _ = process.communicate(timeout=30)
        assert process.returncode == 0, out
        assert time.monotonic() - stopped < 20
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
