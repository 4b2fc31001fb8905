"""Security of the HTTP app (issue 15, item 5): bearer tokens with scopes compared in
constant time, read-only tokens and servers, the browser session and its CSRF check,
the request body limit."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from treadle.engine import Engine
from treadle.hosts.http import TokenAuth, create_app
from treadle.hosts.http.auth import SESSION_COOKIE
from treadle.kernel.deps import KernelSettings
from treadle.kernel.errors import TreadleValidationError
from treadle.tests.http.conftest import ACT, AS_ACT, AS_READ, READ, TOKENS, client_for
from treadle.tests.http.workflows import WORKFLOWS

API = "/api/v1"
START = {"workflow_id": "shout", "input": {"item": "x"}}


@pytest.fixture
async def store_engine(storage_url: str) -> AsyncIterator[Engine]:
    """An engine (no worker) on memory, SQLite and PostgreSQL in turn (``storage_url``)."""
    async with await Engine.open(storage_url, workflows=WORKFLOWS) as engine:
        yield engine


@pytest.fixture
async def client(store_engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(store_engine, auth=TokenAuth(TOKENS))) as c:
        yield c


def code(response: httpx.Response) -> str:
    found: str = response.json()["error"]["code"]
    return found


async def test_missing_or_wrong_token_is_401(client: httpx.AsyncClient) -> None:
    """No token, an unknown token and a malformed header all answer 401 with
    ``WWW-Authenticate: Bearer``; nothing is started."""
    for headers in (
        {},
        {"Authorization": "Bearer nope-nope-nope-nope"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic abc"},
    ):
        response = await client.post(f"{API}/runs", json=START, headers=headers)
        assert response.status_code == 401, headers
        assert code(response) == "Unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    listed = await client.get(f"{API}/runs", headers=AS_READ)
    assert listed.json()["runs"] == []


async def test_read_token_reads_but_cannot_act(client: httpx.AsyncClient) -> None:
    """A ``read`` token lists runs but gets 403 on every action."""
    assert (await client.get(f"{API}/runs", headers=AS_READ)).status_code == 200
    refused = await client.post(f"{API}/runs", json=START, headers=AS_READ)
    assert refused.status_code == 403
    assert code(refused) == "Forbidden"
    replay = await client.post(f"{API}/dlq/replay", headers=AS_READ)
    assert replay.status_code == 403
    assert (await client.post(f"{API}/runs", json=START, headers=AS_ACT)).status_code == 201


async def test_read_only_server_refuses_act_tokens(store_engine: Engine) -> None:
    """``create_app(read_only=True)``: even an ``act`` token gets 403 ``ReadOnly``."""
    app = create_app(store_engine, auth=TokenAuth(TOKENS), read_only=True)
    async with client_for(app) as client:
        refused = await client.post(f"{API}/runs", json=START, headers=AS_ACT)
        assert refused.status_code == 403
        assert code(refused) == "ReadOnly"
        assert (await client.get(f"{API}/runs", headers=AS_ACT)).status_code == 200


async def test_worker_scope_does_not_read_runs(store_engine: Engine) -> None:
    """A ``worker``-only token is not a reader of runs."""
    worker = "worker-token-0123456789"
    app = create_app(store_engine, auth=TokenAuth({worker: {"worker"}}))
    async with client_for(app) as client:
        response = await client.get(f"{API}/runs", headers={"Authorization": f"Bearer {worker}"})
        assert response.status_code == 403


def test_token_sources_are_parsed_and_bad_ones_named(tmp_path: Path) -> None:
    """Token files and ``TREADLE_API_TOKENS`` take ``scope:token`` entries; a bad line, an
    unknown scope or a short token raises naming where it is."""
    file = tmp_path / "tokens"
    file.write_text(f"# comment\nact:{ACT}\n\nread+worker:{READ}  # ci\n")
    auth = TokenAuth.from_file(file)
    acting = auth.authenticate(ACT)
    reading = auth.authenticate(READ)
    assert acting is not None
    assert acting.has("read")
    assert acting.has("act")
    assert reading is not None
    assert reading.has("worker")
    assert not reading.has("act")
    assert auth.authenticate(ACT[:-1]) is None
    assert auth.authenticate(ACT + "x") is None
    env = TokenAuth.from_env({"TREADLE_API_TOKENS": f"act:{ACT},read:{READ}"})
    assert env is not None
    assert env.authenticate(READ) is not None
    assert TokenAuth.from_env({}) is None
    file.write_text("act-no-colon\n")
    with pytest.raises(TreadleValidationError, match=r"tokens:1: expected 'scope:token'"):
        TokenAuth.from_file(file)
    with pytest.raises(TreadleValidationError, match="unknown scope"):
        TokenAuth.parse(f"admin:{ACT}")
    with pytest.raises(TreadleValidationError, match="at least 16 characters"):
        TokenAuth.parse("act:short")
    with pytest.raises(TreadleValidationError, match="token_file: cannot read"):
        TokenAuth.from_file(tmp_path / "missing")


def test_token_comparison_uses_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured token is compared with ``hmac.compare_digest``, even after one
    matched (no early exit that timing could reveal)."""
    import treadle.hosts.http.auth as auth_module

    calls: list[tuple[bytes, bytes]] = []
    real = auth_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    auth = TokenAuth(TOKENS)
    assert auth.authenticate(ACT) is not None
    assert len(calls) == len(TOKENS)


async def _login(client: httpx.AsyncClient, token: str) -> httpx.Response:
    page = await client.get("/login")
    assert page.status_code == 200
    csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert csrf is not None
    return await client.post(
        "/login", data={"token": token, "csrf_token": csrf.group(1), "next": "/api/v1/runs"}
    )


async def test_browser_session_cookie_and_csrf(client: httpx.AsyncClient) -> None:
    """Logging in sets an HttpOnly, SameSite=Strict session cookie holding no token; the
    cookie reads runs; an action with it but without the CSRF token is refused (403
    ``CsrfFailed``), a forged one too; with the page's token it goes through."""
    login = await _login(client, ACT)
    assert login.status_code == 303
    assert login.headers["location"] == "/api/v1/runs"
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert ACT not in cookie
    assert (await client.get(f"{API}/runs")).status_code == 200
    forged = await client.post(f"{API}/runs", json=START)
    assert forged.status_code == 403
    assert code(forged) == "CsrfFailed"
    wrong = await client.post(f"{API}/runs", json=START, headers={"X-CSRF-Token": "0" * 64})
    assert wrong.status_code == 403
    assert code(wrong) == "CsrfFailed"
    page = await client.get("/login")  # any page of ours: the token for this session
    # The login page of a logged-in session still carries a token bound to this session.
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert token is not None
    ok = await client.post(f"{API}/runs", json=START, headers={"X-CSRF-Token": token.group(1)})
    assert ok.status_code == 201, ok.text


async def test_csrf_token_is_bound_to_the_browser(store_engine: Engine) -> None:
    """A CSRF token taken from one browser does not work with another browser's cookies."""
    app = create_app(store_engine, auth=TokenAuth(TOKENS))
    async with client_for(app) as attacker, client_for(app) as victim:
        await _login(attacker, ACT)
        page = await attacker.get("/login")
        stolen = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
        assert stolen is not None
        await _login(victim, ACT)
        refused = await victim.post(
            f"{API}/runs", json=START, headers={"X-CSRF-Token": stolen.group(1)}
        )
        assert refused.status_code == 403
        assert code(refused) == "CsrfFailed"


async def test_login_refuses_a_bad_token_and_open_redirects(client: httpx.AsyncClient) -> None:
    """A wrong token gets the form again (401) and no cookie; ``next`` only redirects
    within the site."""
    bad = await _login(client, "x" * 30)
    assert bad.status_code == 401
    assert SESSION_COOKIE not in bad.headers.get("set-cookie", "")
    page = await client.get("/login")
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert token is not None
    away = await client.post(
        "/login", data={"token": ACT, "csrf_token": token.group(1), "next": "//evil.example/"}
    )
    assert away.status_code == 303
    assert away.headers["location"] == "/"
    no_csrf = await client.post("/login", data={"token": ACT})
    assert no_csrf.status_code == 403


async def test_open_access_refuses_forms_without_csrf_but_takes_json(store_engine: Engine) -> None:
    """With ``auth=None`` a form post (which any web page can send) needs the CSRF token;
    a JSON request (which needs a CORS preflight this app never grants) does not."""
    async with client_for(create_app(store_engine)) as client:
        form = await client.post(f"{API}/runs/x/cancel", data={"reason": "csrf"})
        assert form.status_code == 403
        assert code(form) == "CsrfFailed"
        text = await client.post(
            f"{API}/runs",
            content=b'{"workflow_id":"shout"}',
            headers={"Content-Type": "text/plain"},
        )
        assert text.status_code == 403
        started = await client.post(f"{API}/runs", json=START)
        assert started.status_code == 201


async def test_request_body_limit(store_engine: Engine) -> None:
    """Bodies over ``max_body_bytes`` get 413 ``PayloadTooLarge``, whether declared by
    Content-Length or streamed in chunks; nothing is started."""
    app = create_app(store_engine, auth=TokenAuth(TOKENS), max_body_bytes=1_000)
    async with client_for(app) as client:
        big = {"workflow_id": "shout", "input": {"item": "x" * 2_000}}
        declared = await client.post(f"{API}/runs", json=big, headers=AS_ACT)
        assert declared.status_code == 413
        assert code(declared) == "PayloadTooLarge"

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"workflow_id": "shout", "input": {"item": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}}'

        streamed = await client.post(
            f"{API}/runs", content=chunks(), headers={**AS_ACT, "Content-Type": "application/json"}
        )
        assert streamed.status_code == 413
        assert (await client.get(f"{API}/runs", headers=AS_READ)).json()["runs"] == []
        small = await client.post(f"{API}/runs", json=START, headers=AS_ACT)
        assert small.status_code == 201


def test_create_app_checks_its_arguments(store_engine: Engine) -> None:
    """Bad arguments to ``create_app`` raise naming the argument."""
    with pytest.raises(TreadleValidationError, match="engine"):
        create_app("not an engine")  # type: ignore[arg-type]
    with pytest.raises(TreadleValidationError, match="auth"):
        create_app(store_engine, auth={"t": "act"})  # type: ignore[arg-type]
    with pytest.raises(TreadleValidationError, match="max_body_bytes"):
        create_app(store_engine, max_body_bytes=0)


def test_importing_treadle_does_not_import_fastapi() -> None:
    """The plain install: ``import treadle`` (and the CLI) never import FastAPI."""
    import subprocess
    import sys

    code_ = "import sys, treadle, treadle.hosts.cli; print('fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code_], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class BrokenSink:
    """An event sink that is down: every publish fails."""

    async def publish(self, event: object) -> None:
        raise ConnectionError("sink down")


async def test_dead_letters_listed_and_replayed() -> None:
    """Events the outbox gave up on are listed by GET /dlq with their last error, and
    POST /dlq/replay puts them back (read tokens may list, not replay)."""
    async with await Engine.open(
        "memory://",
        workflows=WORKFLOWS,
        event_sink=BrokenSink(),
        # Every flush retries at once (the outbox backs off 1 s after a failure by default).
        settings=KernelSettings(outbox_retry_delay=timedelta(0)),
    ) as engine:
        await engine.start("shout", {"item": "x"})
        for _ in range(5):  # past the outbox's retries: dead-lettered
            await engine.kernel.dispatch({"type": "outbox.flush"})
        async with client_for(create_app(engine, auth=TokenAuth(TOKENS))) as client:
            dead = (await client.get(f"{API}/dlq", headers=AS_READ)).json()
            assert [d["event"]["type"] for d in dead] == ["workflow:created"]
            assert "sink down" in dead[0]["last_error"]
            assert (await client.post(f"{API}/dlq/replay", headers=AS_READ)).status_code == 403
            replay = await client.post(f"{API}/dlq/replay", json={"max_events": 10}, headers=AS_ACT)
            assert replay.json() == {"replayed": 1}
            assert (await client.get(f"{API}/dlq", headers=AS_READ)).json() == []


async def test_unexpected_errors_are_json_without_internals(store_engine: Engine) -> None:
    """A route that fails unexpectedly answers 500 in the error shape, without the
    exception's text."""
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    app = create_app(store_engine, routers=[router])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "InternalError"
    assert "secret" not in response.text


async def test_app_mounted_inside_another_app(store_engine: Engine) -> None:
    """``outer.mount("/treadle", create_app(...))`` serves the API under the prefix with
    its own auth, and the login form posts back under the prefix."""
    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount("/treadle", create_app(store_engine, auth=TokenAuth(TOKENS)))
    async with client_for(outer) as client:
        assert (await client.get("/treadle/api/v1/runs")).status_code == 401
        listed = await client.get("/treadle/api/v1/runs", headers=AS_READ)
        assert listed.status_code == 200
        assert listed.json() == {"runs": [], "next_cursor": None}
        page = await client.get("/treadle/login")
        assert 'action="/treadle/login"' in page.text
        assert (await client.get("/treadle/healthz")).json() == {"status": "ok"}
