"""Fixtures of the browser tests: the live server (``support.LiveServer``), Debian's
Chromium through Playwright, and signed-in pages. See ``support`` for the environment
variables (TREADLE_REQUIRE_BROWSER, TREADLE_DASHBOARD_SCREENSHOTS)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs the server extra")
pytest.importorskip("uvicorn", reason="the dashboard needs the server extra")
pytest.importorskip("playwright", reason="browser tests need playwright (dev extra)")

from treadle.tests.browser.support import (
    ACT,
    CHROMIUM,
    CHROMIUM_ARGS,
    Dialogs,
    LiveServer,
)


@pytest.fixture(scope="module")
def live_server(
    treadle_sqlite_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One server per test module, on a fresh migrated SQLite file."""
    from treadle.testing.databases import sqlite_database

    url = sqlite_database(tmp_path_factory.mktemp("serve"), template=treadle_sqlite_template)
    server = LiveServer(url)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless; skipped (or failed under TREADLE_REQUIRE_BROWSER=1)
    when it is not installed. Module-scoped: Playwright's sync API keeps an event loop
    running while it is open, which the async tests that come after must not see."""
    if not Path(CHROMIUM).exists():
        reason = f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("TREADLE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}, and TREADLE_REQUIRE_BROWSER=1")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page_factory(browser: Any, live_server: LiveServer) -> Iterator[Any]:
    """``page_factory(token)``: a fresh browser context signed in with ``token`` (or not
    signed in with ``None``), its page and the dialogs it opened."""
    contexts: list[Any] = []

    def make(token: str | None = ACT) -> tuple[Any, Dialogs]:
        context = browser.new_context(
            base_url=live_server.base_url, viewport={"width": 1280, "height": 900}
        )
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        dialogs = Dialogs()
        page.on("dialog", dialogs)
        if token is not None:
            page.goto("/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{live_server.base_url}/")
        return page, dialogs

    yield make
    for context in contexts:
        context.close()
