"""One trace across processes: a pipeline whose first stage runs on worker A, which is
SIGKILLed in the middle of the second stage, which worker B then runs. Both workers are
real ``treadle worker`` processes exporting OTLP over HTTP to a receiver in this test;
the caller starts the run inside its own span, and every stage span joins that trace."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from treadle import Engine
from treadle.tests.observability.conftest import Otel
from treadle.tests.observability.otelapp import workflows

TREADLE = str(Path(sys.executable).with_name("treadle"))


class Receiver:
    """An OTLP/HTTP trace receiver: decodes ``/v1/traces`` requests into plain dicts."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/v1/traces":
                    receiver._take(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _take(self, body: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get(
                "service.name"
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {
                        a.key: (a.value.string_value or a.value.int_value or a.value.bool_value)
                        for a in span.attributes
                    }
                    with self.lock:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "service": service,
                                "attributes": attributes,
                            }
                        )

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["name"] == name]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _worker(name: str, db: str, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TREADLE_TEST_WORKER": name,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": f"worker-{name}",
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        "OTEL_METRICS_EXPORTER": "none",
    }
    argv = [
        TREADLE, "worker", "--app", "treadle.tests.observability.otelapp:workflows",
        "--db", db, "--worker-id", name, "--orchestration-interval", "0.2",
        "--job-poll-interval", "0.1", *extra,
    ]  # fmt: skip
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=out)


async def _until(check: Any, what: str, within: float = 30.0) -> Any:
    """Polls ``check`` (another process's progress: nothing here can be told of it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        found = await check() if asyncio.iscoroutinefunction(check) else check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(120)
async def test_one_trace_spans_two_workers_and_a_sigkill(
    otel: Otel, receiver: Receiver, treadle_database_url: str, tmp_path: Path
) -> None:
    """Stage spans from worker A (killed) and worker B share the caller's trace."""
    a = _worker("A", treadle_database_url, receiver.port, tmp_path / "a.log")
    b: subprocess.Popen[bytes] | None = None
    try:
        async with await Engine.open(
            treadle_database_url,
            workflows,  # type: ignore[arg-type]
            telemetry=otel.telemetry,
        ) as engine:
            tracer = otel.tracer_provider.get_tracer("caller")
            with tracer.start_as_current_span("checkout") as caller:  # the caller's request
                handle = await engine.start("relay", {"n": 1})
            await _until(lambda: receiver.named("treadle.stage first"), "A's first stage span")

            async def second_running() -> bool:
                run = await engine.get_run(handle.run_id)
                return any(
                    s.stage_id == "second" and s.status.value == "RUNNING" for s in run.stages
                )

            await _until(second_running, "the second stage running on A")
            a.send_signal(signal.SIGKILL)
            assert a.wait(timeout=30) == -signal.SIGKILL
            b = _worker(
                "B", treadle_database_url, receiver.port, tmp_path / "b.log",
                "--stale-lease-threshold", "1",
            )  # fmt: skip
            assert await handle.result(timeout=60) == {"n": 20}
            await _until(lambda: receiver.named("treadle.stage second"), "B's second stage span")
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    (start,) = otel.named("treadle.start relay")
    (first,) = receiver.named("treadle.stage first")
    (second,) = receiver.named("treadle.stage second")  # A's attempt died with A
    assert first["trace_id"] == second["trace_id"] == trace_id
    assert first["parent_span_id"] == second["parent_span_id"] == f"{start.context.span_id:016x}"
    assert (first["service"], first["attributes"]["treadle.worker.id"]) == ("worker-A", "A")
    assert (second["service"], second["attributes"]["treadle.worker.id"]) == ("worker-B", "B")
    assert second["attributes"]["treadle.attempt"] == 2
    assert (
        first["attributes"]["treadle.outcome"]
        == second["attributes"]["treadle.outcome"]
        == "completed"
    )
    assert first["attributes"]["treadle.run.id"] == handle.run_id
