"""Fixtures for the HTTP tests: an ``Engine`` on memory, SQLite or PostgreSQL with an
in-process worker, the app built by ``create_app``, and an httpx client on it through
``httpx.ASGITransport`` (no socket)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from treadle.engine import Engine
from treadle.hosts.http import TokenAuth, create_app
from treadle.tests.http.workflows import WORKFLOWS

ACT = "act-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
TOKENS = {ACT: {"act"}, READ: {"read"}}
AS_ACT = {"Authorization": f"Bearer {ACT}"}
AS_READ = {"Authorization": f"Bearer {READ}"}


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def storage_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    fixture = "treadle_sqlite_url" if request.param == "sqlite" else "treadle_postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
async def engine(storage_url: str) -> AsyncIterator[Engine]:
    opened = await Engine.open(storage_url, workflows=WORKFLOWS)
    worker = opened.worker(concurrency=4, orchestration_interval=0.2, job_poll_interval=0.05)
    async with opened, worker:
        yield opened


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app with an ``act`` and a ``read`` token (sends no token itself)."""
    app = create_app(engine, auth=TokenAuth(TOKENS))
    async with client_for(app) as c:
        yield c
    await app.state.treadle.aclose()
