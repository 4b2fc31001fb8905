"""The worker's HTTP endpoints for Kubernetes probes and Prometheus scrapes.

``treadle worker --health-port N`` serves ``/healthz`` and ``/readyz``;
``--metrics-port N`` serves ``/metrics`` (the two may share a port). The server is a few
lines of ``asyncio.start_server`` on the worker's own event loop: no web framework (the
plain install has none) and no thread, so the checks read the worker's state directly
and ``/metrics`` can refresh the storage gauges with the worker's own connections.

- ``/healthz``: 200 while both worker loops run and the last maintenance tick ended
  within ``tick_timeout`` seconds (three orchestration intervals, at least 30 s), else
  503. A wedged loop or a tick stuck on a hung database fails it, so the pod restarts.
- ``/readyz``: 200 when the database answers and its schema is at the head revision
  (the ``treadle doctor`` probe, ``hosts/cli/doctor.sql_probe``), else 503 with the
  reason. ``memory://`` is always ready.
- ``/metrics``: the Prometheus text exposition of Treadle's metrics.

Each answer is a small JSON body (``/metrics``: the exposition text).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

Response = tuple[int, str, bytes]
"""Status code, content type, body."""
Route = Callable[[], Awaitable[Response]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
READ_TIMEOUT = 5.0
"""Seconds a client may take to send its request line and headers."""
READY_TIMEOUT = 5.0
"""Seconds ``/readyz`` waits for the database before answering 503."""


def json_response(status: int, body: Mapping[str, Any]) -> Response:
    return status, "application/json", json.dumps(body, sort_keys=True).encode()


class ProbeServer:
    """A minimal HTTP/1.1 server for ``GET`` of a few fixed paths; one request per
    connection (``Connection: close``)."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)
        self._server: asyncio.Server | None = None

    async def start(self, port: int, host: str = "0.0.0.0") -> int:
        """Listen on ``host:port`` (0: any free port); returns the port bound."""
        self._server = await asyncio.start_server(self._handle, host, port)
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path = target.split("?", 1)[0]
            route = self.routes.get(path)
            if route is None:
                status, ctype, body = json_response(404, {"error": f"no route {path}"})
            elif method not in ("GET", "HEAD"):
                status, ctype, body = json_response(405, {"error": "GET only"})
            else:
                try:
                    status, ctype, body = await route()
                except Exception as exc:  # a failing check is an unhealthy answer
                    status, ctype, body = json_response(503, {"error": repr(exc)})
            head_out = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head_out if method == "HEAD" else head_out + body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def healthz_route(worker: Any, tick_timeout: float) -> Route:
    """``/healthz`` of ``worker`` (a ``runtime.Worker``; ``None`` until it is built)."""

    async def healthz() -> Response:
        current = worker() if callable(worker) else worker
        if current is None or not current.loops_alive:
            return json_response(503, {"status": "down", "reason": "worker loops not running"})
        last = current.last_tick_at
        age = None if last is None else time.monotonic() - last
        body = {"status": "ok", "last_tick_age": age, "in_flight": current.in_flight}
        if age is None or age > tick_timeout:
            reason = "no maintenance tick yet" if age is None else "last tick too old"
            return json_response(503, {**body, "status": "down", "reason": reason})
        return json_response(200, body)

    return healthz


def readyz_route(db: str) -> Route:
    """``/readyz``: the database answers and its schema is at head (``memory://``: ready)."""

    async def readyz() -> Response:
        from treadle.runtime.backends import backend_kind

        if backend_kind(db) == "memory":
            return json_response(200, {"status": "ok", "database": "memory"})
        from treadle.hosts.cli.doctor import sql_probe

        try:
            probe = await asyncio.wait_for(asyncio.to_thread(sql_probe, db), READY_TIMEOUT)
        except Exception as exc:
            from treadle.adapters.urls import scrub

            reason = scrub(f"database unreachable: {exc}", db)
            return json_response(503, {"status": "down", "reason": reason})
        if probe["revision"] != probe["head"]:
            found = probe["revision"] or "no Treadle schema"
            reason = f"schema at {found}, need {probe['head']}: run `treadle migrate`"
            return json_response(503, {"status": "down", "reason": reason})
        return json_response(200, {"status": "ok", "revision": probe["revision"]})

    return readyz


def metrics_route(render: Callable[[], bytes], refresh: Callable[[], Awaitable[None]]) -> Route:
    """``/metrics``: refresh the storage gauges, then render the exposition."""

    async def metrics() -> Response:
        # Storage down: the other metrics still answer, the gauges keep their last
        # reading (alert on /readyz for the database itself).
        with contextlib.suppress(Exception):
            await refresh()
        return 200, "text/plain; version=0.0.4; charset=utf-8", render()

    return metrics
