"""Helpers of the browser tests: a real ``treadle`` HTTP server (uvicorn, SQLite, an
in-process worker) in a thread, and Debian's Chromium driven by Playwright.

Chromium is ``/usr/bin/chromium`` (``apt-get install -y chromium``; never
``playwright install``). Without it the browser tests skip, unless
``TREADLE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) turns the skip into a failure.
``TREADLE_DASHBOARD_SCREENSHOTS=docs/img`` makes the tests save a screenshot of each page
there (docs/dashboard.md shows them).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

CHROMIUM = os.environ.get("TREADLE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ACT = "act-token-browser-0123456789"
READ = "read-token-browser-0123456789"
T = TypeVar("T")


class LiveServer:
    """``create_app`` on a SQLite engine with a worker, served by uvicorn on a free
    loopback port, in a thread with its own event loop. ``call`` runs a coroutine on
    that loop (the engine belongs to it)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._run, name="treadle-serve", daemon=True)
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine: Any = None
        self.app: Any = None

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(30) or self.failed is not None:
            raise RuntimeError(f"the test server did not start: {self.failed!r}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test thread through start()
            self.failed = exc
            self.ready.set()

    async def _main(self) -> None:
        import uvicorn

        from treadle import Engine
        from treadle.hosts.http import create_app
        from treadle.hosts.http.auth import TokenAuth
        from treadle.tests.hosts.dashboard_app import WORKFLOWS

        self._loop = asyncio.get_running_loop()
        async with await Engine.open(self.database_url, workflows=WORKFLOWS) as engine:
            self.engine = engine
            app = create_app(engine, auth=TokenAuth.parse(f"act:{ACT}\nread:{READ}"))
            self.app = app
            config = uvicorn.Config(
                app,
                log_level="warning",
                lifespan="on",
                ws="none",
                timeout_graceful_shutdown=1,
            )
            self._server = uvicorn.Server(config)
            async with engine.worker(
                concurrency=4, job_poll_interval=0.05, orchestration_interval=0.1
            ):
                serving = asyncio.create_task(self._server.serve(sockets=[self._sock]))
                while not self._server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no startup event
                    await asyncio.sleep(0.01)
                self.ready.set()
                await serving

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        state = self.app.state.treadle if self.app is not None else None
        if state is not None and state.hub is not None and self._thread.is_alive():
            self.call(state.hub.aclose())  # ends the open event streams, as `treadle serve` does
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(15)
        self._sock.close()


class Dialogs:
    """Every dialog a page opened; confirmations are accepted, anything else is kept
    as evidence (an ``alert`` means injected script ran)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, dialog: Any) -> None:
        self.seen.append((dialog.type, dialog.message))
        dialog.accept()

    @property
    def alerts(self) -> list[str]:
        return [message for kind, message in self.seen if kind != "confirm"]


def screenshot(page: Any, name: str) -> None:
    """Save ``page`` as ``<name>.png`` when TREADLE_DASHBOARD_SCREENSHOTS names a folder."""
    folder = os.environ.get("TREADLE_DASHBOARD_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)
