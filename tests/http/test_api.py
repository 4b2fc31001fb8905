"""The JSON API on memory, SQLite and PostgreSQL: reads, actions, status codes and
error bodies, as a client sees them through httpx."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from treadle.engine import Engine
from treadle.tests.http.conftest import AS_ACT, AS_READ

API = "/api/v1"


async def start(client: httpx.AsyncClient, workflow_id: str, item: str, **extra: Any) -> str:
    body = {"workflow_id": workflow_id, "input": {"item": item}, **extra}
    response = await client.post(f"{API}/runs", json=body, headers=AS_ACT)
    assert response.status_code in (200, 201), response.text
    run_id: str = response.json()["run_id"]
    return run_id


def error_of(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


async def test_start_is_idempotent_and_the_run_reads_back(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """POST /runs answers 201 with the run id; the same idempotency key answers 200 with
    the same run and ``created: false``; GET /runs/{id} shows input, stages and journal."""
    body = {"workflow_id": "shout", "input": {"item": "hi"}, "idempotency_key": "k-1"}
    first = await client.post(f"{API}/runs", json=body, headers=AS_ACT)
    again = await client.post(f"{API}/runs", json=body, headers=AS_ACT)
    assert first.status_code == 201
    assert first.json()["created"] is True
    assert again.status_code == 200
    assert again.json()["created"] is False
    run_id = first.json()["run_id"]
    assert again.json()["run_id"] == run_id
    assert first.headers["location"] == f"runs/{run_id}"
    assert await engine.handle(run_id).result(timeout=10) == {"text": "HI!"}
    detail = (await client.get(f"{API}/runs/{run_id}", headers=AS_READ)).json()
    assert detail["status"] == "COMPLETED"
    assert detail["kind"] == "pipeline"
    assert detail["input"] == {"item": "hi", "quantity": 1}
    assert detail["output"] == {"text": "HI!"}
    assert [s["stage_id"] for s in detail["stages"]] == ["upper", "exclaim"]
    assert detail["idempotency_key"] == "k-1"


async def test_code_workflow_update_query_signal_over_http(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """Update waits for the workflow's reply; query reads published state; a signal
    completes the run; the run shows its journal."""
    run_id = await start(client, "checkout", "book")
    reply = await client.post(
        f"{API}/runs/{run_id}/update",
        json={"name": "ping", "payload": 7, "timeout": 10},
        headers=AS_ACT,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"reply": {"pong": 7}}
    state = await client.get(f"{API}/runs/{run_id}/query/state", headers=AS_READ)
    assert state.json() == {"name": "state", "value": {"item": "book", "stage": "waiting"}}
    signal = await client.post(
        f"{API}/runs/{run_id}/signal", json={"name": "approval", "payload": True}, headers=AS_ACT
    )
    assert signal.status_code == 200
    assert signal.json() == {"delivered": True}
    assert await engine.handle(run_id).result(timeout=10) == {"item": "book", "approval": True}
    detail = (await client.get(f"{API}/runs/{run_id}", headers=AS_READ)).json()
    assert detail["kind"] == "code"
    kinds = [entry["kind"] for entry in detail["journal"]]
    assert "update" in kinds
    assert "signal" in kinds
    assert detail["timers"] == []


async def test_update_without_reply_times_out_with_504(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """An update the workflow does not answer in ``timeout`` seconds answers 504."""
    run_id = await start(client, "reviewed", "x")
    response = await client.post(
        f"{API}/runs/{run_id}/update", json={"name": "nobody", "timeout": 0.2}, headers=AS_ACT
    )
    assert response.status_code == 504
    assert error_of(response)["code"] == "Timeout"


async def test_review_decided_over_http(client: httpx.AsyncClient, engine: Engine) -> None:
    """The review id comes from the run's events; deciding it resumes the run, and the
    reviewer defaults to the caller's token name."""
    run_id = await start(client, "reviewed", "x")
    review_id = None
    async for event in engine.events(run_id, follow=True, poll_interval=0.02):
        if event.type == "review:requested":  # type: ignore[attr-defined]
            review_id = event.review_id  # type: ignore[attr-defined]
            break
    assert review_id is not None
    decided = await client.post(
        f"{API}/runs/{run_id}/reviews/{review_id}", json={"decision": "approved"}, headers=AS_ACT
    )
    assert decided.status_code == 200, decided.text
    result = await engine.handle(run_id).result(timeout=10)
    assert result["decision"] == "approved"
    assert result["reviewer"].startswith("token:")


async def test_cancel_pause_terminate_answer_changed_and_409(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """Cancel answers ``changed: true`` once and ``false`` after; pausing an ended run is
    a 409 conflict with the Treadle error code."""
    run_id = await start(client, "checkout", "pen")
    cancelled = await client.post(
        f"{API}/runs/{run_id}/cancel", json={"reason": "test"}, headers=AS_ACT
    )
    assert cancelled.json() == {"run_id": run_id, "action": "cancel", "changed": True}
    again = await client.post(f"{API}/runs/{run_id}/cancel", headers=AS_ACT)
    assert again.json()["changed"] is False
    paused = await client.post(f"{API}/runs/{run_id}/pause", headers=AS_ACT)
    assert paused.status_code == 409
    assert error_of(paused)["code"] == "InvalidStateError"
    other = await start(client, "checkout", "ink")
    terminated = await client.post(f"{API}/runs/{other}/terminate", headers=AS_ACT)
    assert terminated.json()["changed"] is True
    assert (await engine.get_run(other)).status.value == "CANCELLED"


async def test_rerun_from_and_fork(client: httpx.AsyncClient, engine: Engine) -> None:
    """rerun resets a finished pipeline from a stage; fork starts a new code-workflow run
    from a journaled step (201) and leaves the source alone."""
    run_id = await start(client, "shout", "a")
    await engine.handle(run_id).result(timeout=10)
    rerun = await client.post(
        f"{API}/runs/{run_id}/rerun", json={"stage_id": "exclaim"}, headers=AS_ACT
    )
    assert rerun.status_code == 200, rerun.text
    assert rerun.json()["from_stage_id"] == "exclaim"
    assert await engine.handle(run_id).result(timeout=10) == {"text": "A!"}
    source = await start(client, "steps", "s")
    await client.post(f"{API}/runs/{source}/signal", json={"name": "go"}, headers=AS_ACT)
    await engine.handle(source).result(timeout=10)
    fork = await client.post(
        f"{API}/runs/{source}/fork", json={"from_step": "second"}, headers=AS_ACT
    )
    assert fork.status_code == 201, fork.text
    forked = fork.json()["run_id"]
    assert forked != source
    unknown = await client.post(
        f"{API}/runs/{source}/fork", json={"from_step": "nope"}, headers=AS_ACT
    )
    assert unknown.status_code == 404
    assert error_of(unknown)["code"] == "StepNotFoundError"


async def test_list_filters_and_cursor_pages_cover_every_run_once(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """Cursor pages return every matching run exactly once, newest first, whatever is
    started meanwhile; status, workflow and attribute filters narrow; aggregate counts."""
    ids = {
        await start(client, "checkout", f"i{n}", search_attributes={"n": n % 2}) for n in range(7)
    }
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"workflow_id": "checkout", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get(f"{API}/runs", params=params, headers=AS_READ)).json()
        seen += [run["id"] for run in page["runs"]]
        pages += 1
        if pages == 1:
            await start(client, "checkout", "late")  # newer: not on later pages
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert set(seen) == ids
    assert len(seen) == 7
    assert pages == 3
    odd = (await client.get(f"{API}/runs", params={"attribute": "n:1"}, headers=AS_READ)).json()
    assert len(odd["runs"]) == 3
    by_status = await client.get(
        f"{API}/runs", params={"status": "COMPLETED,FAILED"}, headers=AS_READ
    )
    assert by_status.json()["runs"] == []
    counts = (
        await client.get(f"{API}/runs/aggregate", params={"by": "workflow_id"}, headers=AS_READ)
    ).json()
    assert counts["counts"]["checkout"] == 8
    assert counts["total"] == 8


async def test_errors_are_json_with_code_and_field(client: httpx.AsyncClient) -> None:
    """404 unknown run, 404 unknown workflow, 422 bad input naming the field, 422 unknown
    body field, 422 bad status and cursor: each JSON with ``code`` and ``field``."""
    missing = await client.get(f"{API}/runs/nope", headers=AS_READ)
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "RunNotFoundError"
    no_wf = await client.post(f"{API}/runs", json={"workflow_id": "nope"}, headers=AS_ACT)
    assert no_wf.status_code == 404
    assert error_of(no_wf)["code"] == "WorkflowNotFoundError"
    bad_input = await client.post(
        f"{API}/runs",
        json={"workflow_id": "checkout", "input": {"item": "x", "quantity": "many"}},
        headers=AS_ACT,
    )
    assert bad_input.status_code == 422
    assert error_of(bad_input)["code"] == "InvalidInputError"
    assert "quantity" in error_of(bad_input)["field"]
    extra = await client.post(
        f"{API}/runs", json={"workflow_id": "checkout", "inptu": {}}, headers=AS_ACT
    )
    assert extra.status_code == 422
    assert error_of(extra)["field"] == "inptu"
    status = await client.get(f"{API}/runs", params={"status": "DONE"}, headers=AS_READ)
    assert status.status_code == 422
    assert error_of(status)["field"] == "status"
    cursor = await client.get(f"{API}/runs", params={"cursor": "garbage"}, headers=AS_READ)
    assert cursor.status_code == 422
    assert error_of(cursor)["field"] == "cursor"
    naive = await client.get(
        f"{API}/runs", params={"created_after": "2026-01-01T00:00:00"}, headers=AS_READ
    )
    assert naive.status_code == 422
    assert error_of(naive)["field"] == "created_after"


async def test_script_payload_comes_back_as_json_data(client: httpx.AsyncClient) -> None:
    """A ``<script>`` payload is returned as a JSON string with a JSON content type (and
    ``nosniff``), never as HTML."""
    payload = "<script>alert('x')</script>"
    run_id = await start(client, "checkout", payload)
    response = await client.get(f"{API}/runs/{run_id}", headers=AS_READ)
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.json()["input"]["item"] == payload
    listed = await client.get(f"{API}/runs/{run_id}/events", headers=AS_READ)
    assert listed.headers["content-type"] == "application/json"


async def test_workflows_dlq_queues_schedules_and_openapi(client: httpx.AsyncClient) -> None:
    """The catalog endpoints answer, workflows carry their input JSON schema, the DLQ is
    empty and replays nothing, and /openapi.json renders every route."""
    workflows = (await client.get(f"{API}/workflows", headers=AS_READ)).json()
    checkout = next(wf for wf in workflows if wf["id"] == "checkout")
    assert checkout["input_schema"]["required"] == ["item"]
    assert checkout["kind"] == "code"
    assert (await client.get(f"{API}/workflows/nope", headers=AS_READ)).status_code == 404
    assert (await client.get(f"{API}/dlq", headers=AS_READ)).json() == []
    replay = await client.post(f"{API}/dlq/replay", json={"max_events": 10}, headers=AS_ACT)
    assert replay.json() == {"replayed": 0}
    assert (await client.get(f"{API}/schedules", headers=AS_READ)).json() == []
    queues = (await client.get(f"{API}/queues", headers=AS_READ)).json()
    assert [q["queue"] for q in queues] == ["default"]
    spec = (await client.get("/openapi.json")).json()
    for path in ("/api/v1/runs", "/api/v1/runs/{run_id}/events", "/api/v1/events", "/readyz"):
        assert path in spec["paths"]


async def test_health_and_readiness(client: httpx.AsyncClient, engine: Engine) -> None:
    """/healthz answers without the database; /readyz checks it and the schema revision."""
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ok"
    if engine.backend is not None and engine.backend.kind != "memory":
        assert body["schema_revision"] == body["head_revision"] is not None


async def test_concurrent_starts_with_one_key_make_one_run(client: httpx.AsyncClient) -> None:
    """Ten concurrent POSTs with one idempotency key start one run."""
    body = {"workflow_id": "checkout", "input": {"item": "x"}, "idempotency_key": "same"}
    answers = await asyncio.gather(
        *(client.post(f"{API}/runs", json=body, headers=AS_ACT) for _ in range(10))
    )
    ok = [a for a in answers if a.status_code in (200, 201)]
    assert {a.json()["run_id"] for a in ok}
    assert len({a.json()["run_id"] for a in ok}) == 1
    assert all(a.status_code in (200, 201, 409) for a in answers)


async def test_start_or_signal_starts_once_and_signals(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """The first start-or-signal starts the run (201) with the signal in its inbox; the
    second, with the same key, signals the same run (200, ``created: false``); once the
    run has ended, signalling it is a 409."""
    body = {
        "workflow_id": "checkout",
        "input": {"item": "s"},
        "signal": "approval",
        "payload": "first",
        "idempotency_key": "tenant-1",
    }
    first = await client.post(f"{API}/runs/start-or-signal", json=body, headers=AS_ACT)
    assert first.status_code == 201, first.text
    assert first.json()["created"] is True
    run_id = first.json()["run_id"]
    again = await client.post(
        f"{API}/runs/start-or-signal", json={**body, "payload": "second"}, headers=AS_ACT
    )
    assert again.status_code == 200, again.text
    assert again.json()["run_id"] == run_id
    assert again.json()["created"] is False
    update = {"name": "ping", "payload": 1, "timeout": 10}
    await client.post(f"{API}/runs/{run_id}/update", json=update, headers=AS_ACT)
    result = await engine.handle(run_id).result(timeout=10)
    assert result == {"item": "s", "approval": "first"}
    ended = await client.post(f"{API}/runs/start-or-signal", json=body, headers=AS_ACT)
    assert ended.status_code == 409


async def test_pause_and_resume_a_waiting_run(client: httpx.AsyncClient, engine: Engine) -> None:
    """Pause and resume answer ``changed: true`` once each; the paused run shows it."""
    run_id = await start(client, "checkout", "pen")
    paused = await client.post(
        f"{API}/runs/{run_id}/pause", json={"reason": "look"}, headers=AS_ACT
    )
    assert paused.json()["changed"] is True
    detail = (await client.get(f"{API}/runs/{run_id}", headers=AS_READ)).json()
    assert detail["paused"] is True
    listed = (await client.get(f"{API}/runs", params={"paused": "true"}, headers=AS_READ)).json()
    assert [r["id"] for r in listed["runs"]] == [run_id]
    resumed = await client.post(f"{API}/runs/{run_id}/resume", headers=AS_ACT)
    assert resumed.json()["changed"] is True
    again = await client.post(f"{API}/runs/{run_id}/resume", headers=AS_ACT)
    assert again.json()["changed"] is False
