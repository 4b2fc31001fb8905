"""``treadle doctor`` on the integrations: an S3 bucket that cannot be reached, and a
webhook whose destination is refused, closed, or failing deliveries."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from treadle.tests.cli.helpers import Invoke
from treadle.tests.conftest import S3_CREDENTIALS

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _checks(result: Any) -> dict[str, dict[str, str]]:
    report = json.loads(result.stdout)
    return {check["name"]: check for check in report["checks"]}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def test_doctor_fails_on_a_missing_bucket(invoke: Invoke, s3_endpoint: str, aws_env: None) -> None:
    """``--blobs s3://...`` naming a bucket that does not exist fails the ``blobs`` check
    with the bucket's name, and doctor exits 1."""
    assert invoke("migrate", app=None).exit_code == 0
    blobs = f"s3://no-such-treadle-bucket/p?endpoint_url={s3_endpoint}"
    result = invoke("--blobs", blobs, "doctor", "--json", app=None)
    assert result.exit_code == 1, result.output
    check = _checks(result)["blobs"]
    assert check["level"] == "FAIL"
    assert "no-such-treadle-bucket" in check["detail"]


def test_doctor_passes_a_reachable_bucket(
    invoke: Invoke, s3_endpoint: str, s3_bucket: str, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket that exists (given by ``$TREADLE_BLOBS_URL``) passes the ``blobs`` check."""
    assert invoke("migrate", app=None).exit_code == 0
    monkeypatch.setenv("TREADLE_BLOBS_URL", f"s3://{s3_bucket}/p?endpoint_url={s3_endpoint}")
    result = invoke("doctor", "--json", app=None)
    assert result.exit_code == 0, result.output
    check = _checks(result)["blobs"]
    assert check["level"] == "ok"
    assert s3_bucket in check["detail"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_doctor_fails_on_a_webhook_nobody_listens_on(
    invoke: Invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhook whose receiver is down fails the ``webhook`` check: connection refused."""
    assert invoke("migrate", app=None).exit_code == 0
    monkeypatch.setenv("TREADLE_WEBHOOK_URL", f"http://127.0.0.1:{_closed_port()}/hook")
    monkeypatch.setenv("TREADLE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("TREADLE_WEBHOOK_ALLOW", "127.0.0.1")
    result = invoke("doctor", "--json", app=None)
    assert result.exit_code == 1, result.output
    check = _checks(result)["webhook"]
    assert check["level"] == "FAIL"
    assert "cannot connect" in check["detail"]


def test_doctor_fails_on_a_refused_webhook_destination(
    invoke: Invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhook pointed at an internal address without allowing it fails the check
    with the address and the way to allow it."""
    assert invoke("migrate", app=None).exit_code == 0
    monkeypatch.setenv("TREADLE_WEBHOOK_URL", "http://localhost:9/hook")
    monkeypatch.setenv("TREADLE_WEBHOOK_SECRET", SECRET)
    result = invoke("doctor", "--json", app=None)
    assert result.exit_code == 1, result.output
    detail = _checks(result)["webhook"]["detail"]
    assert "WebhookDestinationError" in detail
    assert "allow=" in detail


@pytest.fixture
def failing_receiver() -> Iterator[str]:
    """A receiver that accepts connections and answers every POST with 503."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def test_doctor_fails_while_deliveries_fail(
    invoke: Invoke, db_url: str, failing_receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that is up but answers 503: events failing delivery fail the check,
    naming the run and the last error."""
    import asyncio

    from treadle.adapters.webhook import WebhookEventSink
    from treadle.engine import Engine
    from treadle.kernel.events import WorkflowCreated

    assert invoke("migrate", app=None).exit_code == 0

    async def fail_one() -> None:
        sink = WebhookEventSink(failing_receiver, SECRET, allow="127.0.0.1")
        async with await Engine.open(db_url, event_sink=sink) as engine:
            event = WorkflowCreated(
                workflow_run_id="run-hooked",
                timestamp=datetime.now(UTC),
                workflow_id="wf",
                priority=5,
            )
            async with engine.kernel.deps.persistence.transaction() as tx:
                await tx.outbox.append([event])
            result = await engine.kernel.dispatch({"type": "outbox.flush"})
            assert result.failed == 1

    asyncio.run(fail_one())
    monkeypatch.setenv("TREADLE_WEBHOOK_URL", failing_receiver)
    monkeypatch.setenv("TREADLE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("TREADLE_WEBHOOK_ALLOW", "127.0.0.0/8")
    result = invoke("doctor", "--json", app=None)
    assert result.exit_code == 1, result.output
    detail = _checks(result)["webhook"]["detail"]
    assert "1 event(s) failing delivery" in detail
    assert "run-hooked" in detail
    assert "answered 503" in detail
