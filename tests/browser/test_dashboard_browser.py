"""The dashboard in real Chromium (issue 15): start a run, watch it complete live, open
its timeline, decide a review, cancel a run, and refuse forged requests."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from treadle.kernel.model import RunStatus
from treadle.tests.browser.support import READ, LiveServer, screenshot
from treadle.tests.hosts.dashboard_app import XSS


async def _reach(engine: Any, run_id: str, *statuses: RunStatus) -> None:
    """Wait (on the server's loop) until the run has one of ``statuses``."""
    while (await engine.get_run(run_id, with_stages=False)).status not in statuses:  # noqa: ASYNC110 - a state read, no event to await
        await asyncio.sleep(0.02)


def _start(server: LiveServer, workflow_id: str, title: str, *, until: RunStatus) -> str:
    async def go() -> str:
        handle = await server.engine.start(workflow_id, {"title": title})
        await _reach(server.engine, handle.run_id, until)
        return str(handle.run_id)

    return server.call(go())


def _status(page: Any) -> str:
    return str(page.get_attribute("#run-facts", "data-status"))


def test_start_a_run_and_watch_it_complete_live(page_factory: Any, live_server: LiveServer) -> None:
    """A run started from the start form opens its page; when it ends, the page shows
    COMPLETED and the new events without being reloaded."""
    page, dialogs = page_factory()
    page.click("#start-run summary")
    page.select_option("#start-run select[name=workflow_id]", "gated")
    page.fill("#start-run textarea[name=input]", '{"title": "live"}')
    page.click("#start-run button[type=submit]")
    page.wait_for_url(re.compile(r"/runs/[^/?]+\?done=started$"))
    assert [kind for kind, _ in dialogs.seen] == ["confirm"]
    run_id = page.url.split("/runs/", 1)[1].split("?", 1)[0]
    page.wait_for_selector("#run-facts[data-status=SUSPENDED]")
    page.evaluate("window.__same_page = true")
    screenshot(page, "run-waiting")

    live_server.call(live_server.engine.signal(run_id, "go", {"n": 1}))

    page.wait_for_selector("#run-facts[data-status=COMPLETED]")
    page.wait_for_selector("#events tr[data-type='workflow:completed']")
    assert page.evaluate("window.__same_page") is True  # updated in place, not reloaded
    assert '"n": 1' in page.inner_text("#run-output")


def test_runs_table_updates_live(page_factory: Any, live_server: LiveServer) -> None:
    """A run started elsewhere appears in the open runs table, and its count moves, with
    no reload."""
    page, _ = page_factory()
    page.evaluate("window.__same_page = true")
    run_id = _start(live_server, "report", "from elsewhere", until=RunStatus.COMPLETED)
    page.wait_for_selector(f"tr[data-run-id='{run_id}'][data-status=COMPLETED]")
    assert page.evaluate("window.__same_page") is True


def test_open_a_runs_timeline(page_factory: Any, live_server: LiveServer) -> None:
    """From the runs table to the run page: the Gantt chart shows each stage's lane, the
    failed first attempt of the retried stage, and the parallel group."""
    run_id = _start(live_server, "report", "timeline", until=RunStatus.COMPLETED)
    page, _ = page_factory()
    page.click(f"tr[data-run-id='{run_id}'] a")
    page.wait_for_url(f"**/runs/{run_id}")
    page.wait_for_selector("#timeline svg.gantt")
    lanes = page.eval_on_selector_all(
        "#timeline g.gantt-row", "rows => rows.map(r => r.dataset.label)"
    )
    assert lanes == ["fetch", "score", "tag", "publish"]
    assert page.locator("#timeline rect.seg-failed").count() == 1
    assert page.locator("#timeline rect.seg-retry-wait").count() == 1
    assert page.locator("#timeline rect.seg-completed").count() == 4
    screenshot(page, "run-timeline")


def test_decide_a_review_and_no_payload_runs_as_script(
    page_factory: Any, live_server: LiveServer
) -> None:
    """The review inbox shows a waiting review whose artifact holds a ``<script>``
    payload as text; approving it (after the confirmation) resumes the run. No alert,
    no injected element, anywhere the payload is shown."""
    run_id = _start(live_server, "approval", XSS, until=RunStatus.SUSPENDED)
    page, dialogs = page_factory()
    page.goto("/reviews")
    review = page.locator(f"article.review:has(a[href='/runs/{run_id}'])")
    shown = json.dumps(XSS)  # the payload as the page shows it: JSON text
    assert shown in review.locator("pre.artifact").inner_text()
    screenshot(page, "reviews")
    page.goto(f"/runs/{run_id}")
    assert shown in page.inner_text("#run-input")
    page.goto("/")
    page.goto("/reviews")
    review.locator("button.approve").click()
    page.wait_for_url("**/reviews?done=approved")
    live_server.call(_reach(live_server.engine, run_id, RunStatus.COMPLETED))
    assert live_server.call(live_server.engine.handle(run_id).result(timeout=5)) == "approved"
    assert [kind for kind, _ in dialogs.seen] == ["confirm"]
    assert dialogs.alerts == []
    assert page.evaluate("window.__pwned") is None
    assert page.title() != "pwned"


def test_cancel_a_run(page_factory: Any, live_server: LiveServer) -> None:
    """The cancel button asks first, then the run page shows the run CANCELLED."""
    run_id = _start(live_server, "gated", "to cancel", until=RunStatus.SUSPENDED)
    page, dialogs = page_factory()
    page.goto(f"/runs/{run_id}")
    page.fill("#actions input[name=reason]", "no longer needed")
    page.click("#cancel-run")
    page.wait_for_url(f"**/runs/{run_id}?done=cancelled")
    assert _status(page) == "CANCELLED"
    assert dialogs.seen
    assert dialogs.seen[0][0] == "confirm"
    assert "no longer needed" in page.inner_text("#events")


def test_forged_requests_are_refused(page_factory: Any, live_server: LiveServer) -> None:
    """A cancel posted without a session (401), from a signed-in page without the CSRF
    token (403), or by a read-only token with it (403) changes nothing; a read-only
    page shows no action buttons."""
    run_id = _start(live_server, "gated", "keep me", until=RunStatus.SUSPENDED)
    anonymous, _ = page_factory(None)
    no_token = anonymous.request.post(
        f"{live_server.base_url}/runs/{run_id}/cancel", form={"reason": "forged"}
    )
    assert no_token.status == 401

    page, _ = page_factory()
    page.goto(f"/runs/{run_id}")
    forged = page.evaluate(
        """async (url) => (await fetch(url, {method: "POST",
              body: new URLSearchParams({reason: "forged"})})).status""",
        f"/runs/{run_id}/cancel",
    )
    assert forged == 403

    reader, _ = page_factory(READ)
    reader.goto(f"/runs/{run_id}")
    assert reader.locator("#actions").count() == 0
    with_csrf = reader.evaluate(
        """async (url) => (await fetch(url, {method: "POST", body: new URLSearchParams({
              reason: "forged", csrf_token: document.body.dataset.csrf})})).status""",
        f"/runs/{run_id}/cancel",
    )
    assert with_csrf == 403
    assert live_server.call(live_server.engine.get_run(run_id)).status is RunStatus.SUSPENDED


def test_queues_and_throughput_pages(page_factory: Any, live_server: LiveServer) -> None:
    """The queues page lists the default queue and the live worker; the throughput chart
    has a bar group per minute and counts the runs that completed."""
    _start(live_server, "report", "for the chart", until=RunStatus.COMPLETED)
    failed = _start(live_server, "report", "fail: missing", until=RunStatus.FAILED)
    page, _ = page_factory()
    page.goto(f"/runs/{failed}")
    assert "no such document" in page.inner_text("#run-error")
    assert "ValueError" in page.inner_text(".traceback")
    screenshot(page, "run-failed")
    page.goto("/queues")
    page.wait_for_selector("#queues tr[data-queue=default]")
    assert page.locator("#workers tbody tr").count() >= 1
    screenshot(page, "queues")
    page.goto("/throughput")
    assert page.locator("#throughput svg g.minute").count() == 60
    assert page.locator("#throughput rect.bar-completed").count() >= 1
    screenshot(page, "throughput")
    page.goto("/")
    page.wait_for_selector("#runs-table tr[data-status=FAILED]")
    screenshot(page, "runs")
    page.goto("/login")
    screenshot(page, "login")
