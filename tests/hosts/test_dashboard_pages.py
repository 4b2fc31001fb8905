"""The dashboard's pages and actions through httpx's ASGI transport (no browser): what
each page shows, that payloads are escaped, and who may act."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs the server extra")

import httpx

from treadle import Engine
from treadle.hosts.http import create_app
from treadle.hosts.http.auth import TokenAuth
from treadle.kernel.deps import KernelSettings
from treadle.kernel.model import RunStatus
from treadle.tests.hosts.dashboard_app import WORKFLOWS, XSS

ACT = "act-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
TOKENS = TokenAuth.parse(f"act:{ACT}\nread:{READ}")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest) -> str:
    """Every storage the dashboard reads from: memory, a SQLite file, PostgreSQL."""
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue(f"treadle_{request.param}_url"))


@pytest.fixture
async def engine(url: str) -> AsyncIterator[Engine]:
    async with await Engine.open(url, workflows=WORKFLOWS) as opened:
        yield opened


def _client(engine: Engine, *, read_only: bool = False) -> httpx.AsyncClient:
    app = create_app(engine, auth=TOKENS, read_only=read_only)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html) or re.search(
        r'data-csrf="([^"]+)"', html
    )
    assert found, "the page embeds no CSRF token"
    return found.group(1)


async def _login(client: httpx.AsyncClient, token: str) -> None:
    form = await client.get("/login")
    response = await client.post(
        "/login", data={"token": token, "next": "/", "csrf_token": _csrf(form.text)}
    )
    assert response.status_code == 303, response.text


async def _finish(engine: Engine, *run_ids: str) -> None:
    """Let an in-process worker run until every run has stopped moving."""
    async with engine.worker(concurrency=4, job_poll_interval=0.02, orchestration_interval=0.05):
        for run_id in run_ids:
            for _ in range(500):
                run = await engine.get_run(run_id, with_stages=False)
                if run.status.terminal or run.status is RunStatus.SUSPENDED:
                    break
                await asyncio.sleep(0.01)


async def test_runs_page_lists_runs_with_counts_by_status_and_filters(engine: Engine) -> None:
    """The runs page shows each run with its status, the counts by status, and narrows
    to the statuses and workflow asked for."""
    done = await engine.start("report", {"title": "hello"})
    waiting = await engine.start("gated", {"title": "wait"})
    await _finish(engine, done.run_id, waiting.run_id)
    async with _client(engine) as client:
        await _login(client, READ)
        page = await client.get("/")
        assert page.status_code == 200
        assert done.run_id in page.text
        assert waiting.run_id in page.text
        assert re.search(r'data-status="COMPLETED">1<', page.text)
        assert re.search(r'data-status="SUSPENDED">1<', page.text)
        only = await client.get("/ui/runs-table", params={"status": "COMPLETED"})
        assert done.run_id in only.text
        assert waiting.run_id not in only.text
        recent = await client.get("/ui/runs-table", params={"since": "1h"})
        assert done.run_id in recent.text
        bad = await client.get("/ui/runs-table", params={"since": "forever"})
        assert "since: must be one of 1h, 24h, 7d, 30d" in bad.text
        by_workflow = await client.get("/", params={"workflow_id": "gated"})
        assert waiting.run_id in by_workflow.text
        assert done.run_id not in by_workflow.text


async def test_run_page_draws_the_stage_timeline_and_payloads(engine: Engine) -> None:
    """A pipeline's run page has the SVG Gantt chart with the retried stage's failed
    attempt, the input and the output."""
    handle = await engine.start("report", {"title": "hello"})
    await _finish(engine, handle.run_id)
    async with _client(engine) as client:
        await _login(client, READ)
        page = await client.get(f"/runs/{handle.run_id}")
    assert page.status_code == 200
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="gantt"' in page.text
    assert page.text.count('class="seg seg-failed"') == 1  # fetch's first attempt
    assert 'data-label="publish"' in page.text
    assert "&#34;score&#34;: 5" in page.text or '"score": 5' in page.text
    assert "stage:completed" in page.text
    assert '<dd id="run-ai">$0.0125 · 120 tokens</dd>' in page.text
    # The run's AI calls, one row each: where, model, tokens and cost, never the prompt.
    calls = page.text.split('<section id="ai-calls">', 1)[1].split("</section>", 1)[0]
    assert calls.split("<tbody>", 1)[1].count("<tr>") == 1
    assert "<code>score</code>" in calls
    assert "test-model" in calls
    assert "100 / 20" in calls
    assert "$0.0125" in calls
    assert "SECRET-PROMPT" not in page.text


async def test_runs_table_shows_each_runs_ai_cost(engine: Engine) -> None:
    """A cost column appears once a listed run has recorded AI calls."""
    quiet = await engine.start("gated", {"title": "no ai"})
    await _finish(engine, quiet.run_id)
    async with _client(engine) as client:
        await _login(client, READ)
        assert "AI cost" not in (await client.get("/")).text
        handle = await engine.start("report", {"title": "ai"})
        await _finish(engine, handle.run_id)
        table = (await client.get("/ui/runs-table")).text
    assert "<th>AI cost</th>" in table
    assert '<td class="cost">$0.0125</td>' in table


async def test_code_workflow_page_shows_its_journal(engine: Engine) -> None:
    """A code workflow's run page lists its journal and draws its waits."""
    handle = await engine.start("gated", {"title": "wait"})
    await _finish(engine, handle.run_id)
    async with _client(engine) as client:
        await _login(client, READ)
        page = await client.get(f"/runs/{handle.run_id}")
    assert 'id="journal"' in page.text
    assert '<dd id="waiting-for">signal go</dd>' in page.text
    assert "signal &#39;go&#39; #1" in page.text
    assert 'class="seg seg-waiting"' in page.text


async def test_no_page_renders_a_payload_as_html(engine: Engine) -> None:
    """A ``<script>`` in a run's input, search attribute or review artifact is shown as
    text on the runs page, the run page and the review inbox."""
    handle = await engine.start("approval", {"title": XSS})
    await engine.annotate(handle.run_id, {"note": XSS})
    await _finish(engine, handle.run_id)
    async with _client(engine) as client:
        await _login(client, READ)
        pages = [
            await client.get("/"),
            await client.get(f"/runs/{handle.run_id}"),
            await client.get("/reviews"),
        ]
    for page in pages:
        assert page.status_code == 200
        assert "<script>document.title" not in page.text
        assert "<img src=x" not in page.text
        assert "&lt;script&gt;document.title" in page.text


async def test_pages_send_a_browser_without_a_session_to_login(engine: Engine) -> None:
    """Without credentials a page redirects to ``/login?next=...``; an htmx request
    gets ``HX-Redirect`` instead."""
    async with _client(engine) as client:
        page = await client.get("/queues")
        assert page.status_code == 303
        assert page.headers["location"] == "/login?next=/queues"
        partial = await client.get("/ui/runs-table", headers={"HX-Request": "true"})
        assert partial.status_code == 401
        assert partial.headers["HX-Redirect"].startswith("/login?next=")


async def test_cancel_from_the_dashboard_needs_the_csrf_token(engine: Engine) -> None:
    """An act session cancels a run with the page's CSRF token; the same form without
    it (a forged cross-site post) is refused with 403 and the run goes on."""
    handle = await engine.start("gated", {"title": "wait"})
    await _finish(engine, handle.run_id)
    async with _client(engine) as client:
        await _login(client, ACT)
        page = await client.get(f"/runs/{handle.run_id}")
        assert 'id="cancel-run"' in page.text
        forged = await client.post(f"/runs/{handle.run_id}/cancel", data={"reason": "x"})
        assert forged.status_code == 403
        assert (await engine.get_run(handle.run_id)).status is RunStatus.SUSPENDED
        ok = await client.post(
            f"/runs/{handle.run_id}/cancel",
            data={"reason": "test", "csrf_token": _csrf(page.text)},
        )
        assert ok.status_code == 303
        assert ok.headers["location"] == f"/runs/{handle.run_id}?done=cancelled"
        again = await client.post(
            f"/runs/{handle.run_id}/cancel", data={"csrf_token": _csrf(page.text)}
        )
        assert "already%20ended" in again.headers["location"]
    assert (await engine.get_run(handle.run_id)).status is RunStatus.CANCELLED


async def test_read_only_tokens_see_no_actions_and_cannot_forge_one(engine: Engine) -> None:
    """A read token's pages have no action buttons, and a form posted with a valid CSRF
    token still gets 403; so does an act token on a read-only app."""
    handle = await engine.start("gated", {"title": "wait"})
    await _finish(engine, handle.run_id)
    async with _client(engine) as client:
        await _login(client, READ)
        page = await client.get(f"/runs/{handle.run_id}")
        assert 'id="actions"' not in page.text
        assert "Start a run" not in (await client.get("/")).text
        forged = await client.post(
            f"/runs/{handle.run_id}/cancel", data={"csrf_token": _csrf(page.text)}
        )
        assert forged.status_code == 403
    async with _client(engine, read_only=True) as client:
        await _login(client, ACT)
        page = await client.get(f"/runs/{handle.run_id}")
        assert 'id="actions"' not in page.text
        refused = await client.post(
            f"/runs/{handle.run_id}/cancel", data={"csrf_token": _csrf(page.text)}
        )
        assert refused.status_code == 403
    assert (await engine.get_run(handle.run_id)).status is RunStatus.SUSPENDED


async def test_review_inbox_lists_waiting_reviews_and_decides_them(engine: Engine) -> None:
    """The inbox shows a waiting ``ctx.review`` with its artifact; approving it from
    there resumes the run with the decision."""
    handle = await engine.start("approval", {"title": "launch"})
    await _finish(engine, handle.run_id)
    async with _client(engine) as client:
        await _login(client, ACT)
        inbox = await client.get("/reviews")
        found = re.search(r'data-review-id="([^"]+)"', inbox.text)
        assert found, inbox.text
        assert handle.run_id in inbox.text
        assert "launch" in inbox.text
        decided = await client.post(
            f"/runs/{handle.run_id}/review",
            data={
                "review_id": found.group(1),
                "decision": "approved",
                "back": "reviews",
                "csrf_token": _csrf(inbox.text),
            },
        )
        assert decided.status_code == 303
        assert decided.headers["location"] == "/reviews?done=approved"
        await _finish(engine, handle.run_id)
        assert "Nothing waits for a decision" in (await client.get("/reviews")).text
    assert await handle.result(timeout=5) == "approved"


async def test_start_signal_and_bad_input_from_the_dashboard(engine: Engine) -> None:
    """The start form starts a run and opens its page; a signal form wakes it; bad JSON
    answers 422 naming the field, and nothing is started."""
    async with _client(engine) as client:
        await _login(client, ACT)
        token = _csrf((await client.get("/")).text)
        bad = await client.post(
            "/ui/start", data={"workflow_id": "gated", "input": "{oops", "csrf_token": token}
        )
        assert bad.status_code == 422
        assert "input" in bad.text
        assert await engine.list() == []
        started = await client.post(
            "/ui/start",
            data={"workflow_id": "gated", "input": '{"title": "t"}', "csrf_token": token},
        )
        assert started.status_code == 303
        run_id = started.headers["location"].split("/runs/", 1)[1].split("?", 1)[0]
        await _finish(engine, run_id)
        sent = await client.post(
            f"/runs/{run_id}/signal",
            data={"name": "go", "payload": '{"n": 1}', "csrf_token": token},
        )
        assert sent.status_code == 303
        await _finish(engine, run_id)
    assert await engine.handle(run_id).result(timeout=5) == {"title": "t", "go": {"n": 1}}


async def test_queues_and_throughput_pages(engine: Engine) -> None:
    """The queues page lists the default queue with its depths and the DLQ section; the
    throughput page counts the runs that ended in the last hour."""
    handle = await engine.start("report", {"title": "hello"})
    await _finish(engine, handle.run_id)
    await engine.start("report", {"title": "queued"})  # waits: no worker runs now
    async with _client(engine) as client:
        await _login(client, READ)
        queues = await client.get("/queues")
        assert queues.status_code == 200
        assert 'data-queue="default"' in queues.text
        assert 'id="dlq"' in queues.text
        chart = await client.get("/throughput")
    assert chart.status_code == 200
    assert '<b class="good">1 completed</b>' in chart.text
    assert chart.text.count('class="minute"') == 60


async def test_static_files_are_served_from_the_package(engine: Engine) -> None:
    """htmx, its SSE extension, the script and the stylesheet come from the wheel."""
    async with _client(engine) as client:
        for name in ("htmx.min.js", "htmx-ext-sse.min.js", "dashboard.js", "dashboard.css"):
            response = await client.get(f"/static/{name}")
            assert response.status_code == 200, name
            assert len(response.content) > 100
        assert (await client.get("/static/../app.py")).status_code == 404


async def test_run_stream_resumes_after_the_last_event_and_pushes_new_ones(engine: Engine) -> None:
    """The run page's stream starts after the sequence the page (or ``Last-Event-ID``)
    names, without gaps or repeats, then delivers the run's next events as they commit,
    each batch followed by a ``changed`` notice; it ends when the app's hub closes."""
    from treadle.hosts.http.api.stream import hub_of
    from treadle.hosts.http.dashboard.streams import run_event_stream

    handle = await engine.start("gated", {"title": "t"})
    await _finish(engine, handle.run_id)
    stored = [e.sequence async for e in engine.events(handle.run_id)]
    app = create_app(engine, auth=TOKENS)
    hub = hub_of(app.state.treadle)
    stream = run_event_stream(hub, engine, handle.run_id, 2, lambda e: f"<tr>{e.type}</tr>")
    try:
        got: list[tuple[str, str | None]] = []
        while not got or got[-1][0] != "changed":
            name, _, ident = await asyncio.wait_for(anext(stream), 5)
            got.append((name, ident))
        assert [int(i) for n, i in got if n == "run-event" and i] == stored[2:]
        await engine.signal(handle.run_id, "go", 1)
        await _finish(engine, handle.run_id)
        pushed: list[int] = []
        while True:
            name, data, ident = await asyncio.wait_for(anext(stream), 5)
            if name == "run-event":
                assert ident is not None
                pushed.append(int(ident))
                if "workflow:completed" in data:
                    break
        assert pushed == list(range(stored[-1] + 1, stored[-1] + 1 + len(pushed)))
        await app.state.treadle.aclose()  # what `treadle serve` does on SIGTERM
        rest = [item async for item in stream]  # the rest of the batch, then the end
        assert all(name in ("run-event", "changed") for name, _, _ in rest)
    finally:
        await stream.aclose()
        await app.state.treadle.aclose()


async def test_queues_page_lists_the_dlq_and_replays_it(url: str) -> None:
    """Events the outbox gave up publishing appear on the queues page with their error;
    an act session replays them from there (after which the DLQ is empty)."""
    from treadle.kernel import commands as c
    from treadle.testing import CollectingEventSink

    sink = CollectingEventSink()
    sink.fail_when = lambda event: True
    # Every flush retries at once (the outbox backs off 1 s after a failure by default).
    settings = KernelSettings(outbox_retry_delay=timedelta(0))
    async with await Engine.open(
        url, workflows=WORKFLOWS, event_sink=sink, settings=settings
    ) as engine:
        handle = await engine.start("gated", {"title": "t"})
        for _ in range(3):  # three failed attempts dead-letter the event
            await engine.kernel.dispatch(c.OutboxFlush())
        [dead] = await engine.outbox.dead_letters()
        async with _client(engine) as client:
            await _login(client, ACT)
            page = await client.get("/queues")
            assert handle.run_id in page.text
            assert "ConnectionError" in page.text or (dead.last_error or "") in page.text
            assert 'id="replay-dlq"' in page.text
            sink.fail_when = None
            replayed = await client.post("/ui/dlq/replay", data={"csrf_token": _csrf(page.text)})
            assert replayed.status_code == 303
            assert replayed.headers["location"].startswith("/queues?done=1%20events")
        assert await engine.outbox.dead_letters() == []


async def test_fork_and_rerun_from_the_dashboard(engine: Engine) -> None:
    """Fork opens the new run of a code workflow made from the chosen step; re-run
    resets a finished pipeline from a stage and runs it again."""
    code = await engine.start("gated", {"title": "t"})
    pipeline = await engine.start("report", {"title": "p"})
    await _finish(engine, code.run_id, pipeline.run_id)
    async with _client(engine) as client:
        await _login(client, ACT)
        page = await client.get(f"/runs/{code.run_id}")
        assert 'id="fork-run"' in page.text
        forked = await client.post(
            f"/runs/{code.run_id}/fork",
            data={"from_step": "prepare", "csrf_token": _csrf(page.text)},
        )
        assert forked.status_code == 303
        new_id = forked.headers["location"].split("/runs/", 1)[1].split("?", 1)[0]
        assert new_id != code.run_id
        page = await client.get(f"/runs/{pipeline.run_id}")
        assert 'id="rerun-from"' in page.text
        rerun = await client.post(
            f"/runs/{pipeline.run_id}/rerun",
            data={"stage_id": "publish", "csrf_token": _csrf(page.text)},
        )
        assert rerun.status_code == 303
        unknown = await client.post(
            f"/runs/{pipeline.run_id}/rerun",
            data={"stage_id": "nope", "csrf_token": _csrf(page.text)},
        )
        assert unknown.status_code >= 400
        assert "nope" in unknown.text
    await _finish(engine, new_id, pipeline.run_id)
    assert (await engine.get_run(new_id)).status is RunStatus.SUSPENDED
    assert await pipeline.result(timeout=5) == {"title": "p", "score": 1}


async def test_run_page_lists_only_the_newest_events_of_a_long_run(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with more events than the page lists shows the newest ones and says how
    many older ones it left out (the timeline still uses them all)."""
    from treadle.hosts.http.dashboard import pages

    monkeypatch.setattr(pages, "EVENTS_SHOWN", 3)
    handle = await engine.start("report", {"title": "long"})
    await _finish(engine, handle.run_id)
    total = len([e async for e in engine.events(handle.run_id)])
    async with _client(engine) as client:
        await _login(client, READ)
        page = await client.get(f"/runs/{handle.run_id}")
    assert f"{total - 3} older events not shown" in page.text
    assert page.text.count('<tr class="event') == 3
    assert 'data-type="workflow:completed"' in page.text
    assert page.text.count('class="seg seg-completed"') == 4


async def test_dashboard_mounted_under_a_path_links_within_it(engine: Engine) -> None:
    """Mounted inside another app at ``/treadle``, every link, script and redirect of the
    dashboard stays under that path; an API client may read pages with its bearer token."""
    from fastapi import FastAPI

    handle = await engine.start("report", {"title": "mounted"})
    site = FastAPI()
    site.mount("/treadle", create_app(engine, auth=TOKENS))
    transport = httpx.ASGITransport(app=site)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        page = await client.get("/treadle/", headers={"Authorization": f"Bearer {READ}"})
        assert page.status_code == 200
        assert 'src="/treadle/static/htmx.min.js"' in page.text
        assert f'href="/treadle/runs/{handle.run_id}"' in page.text
        assert 'sse-connect="/treadle/ui/stream"' in page.text
        away = await client.get("/treadle/reviews")
        assert away.status_code == 303
        assert away.headers["location"] == "/treadle/login?next=/treadle/reviews"
        script = await client.get("/treadle/static/dashboard.js")
        assert script.status_code == 200
