"""The dashboard's actions (POST forms): start, cancel, signal, re-run from a stage,
fork from a step, decide a review, replay the DLQ.

Each depends on ``require_act``, which checks the ``act`` scope, the app's
``read_only`` flag and the CSRF token, so a read-only token gets 403 even for a forged
form. Each answers with a redirect (303, Post/Redirect/Get) to the page that shows the
outcome, saying what was done, or with the error page and the error's HTTP status.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from treadle.hosts.http.auth import Principal
from treadle.hosts.http.dashboard.render import render, root
from treadle.hosts.http.deps import require_act
from treadle.hosts.http.errors import status_for
from treadle.hosts.http.state import http_state
from treadle.kernel.arguments import invalid
from treadle.kernel.errors import TreadleError

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

Actor = Annotated[Principal, Depends(require_act)]
"""A caller who may act: the ``act`` scope, the app not read-only, the CSRF token checked."""


async def _act(
    request: Request,
    principal: Principal,
    run_id: str,
    call: Callable[[], Awaitable[tuple[str, str]]],
    *,
    back: str = "",
) -> Response:
    """Run ``call`` (which returns the run to show and what was done) and redirect to
    that run's page, or to ``back``; a Treadle error renders the error page instead."""
    try:
        where, done = await call()
    except TreadleError as exc:
        return render(
            request, "error.html", principal, status=status_for(exc), error=exc, run_id=run_id
        )
    page = back or f"/runs/{urllib.parse.quote(where)}"
    return RedirectResponse(
        f"{root(request)}{page}?done={urllib.parse.quote(done)}", status_code=303
    )


def _json_field(text: str, field: str) -> Any:
    """A form field holding JSON; empty means ``None``. Bad JSON names the field."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(field, f"must be JSON: {exc.msg} at line {exc.lineno}") from None


@router.post("/ui/start")
async def start(
    request: Request,
    principal: Actor,
    workflow_id: Annotated[str, Form()],
    input: Annotated[str, Form()] = "",
    idempotency_key: Annotated[str, Form()] = "",
) -> Response:
    engine = http_state(request).engine

    async def go() -> tuple[str, str]:
        handle = await engine.start(
            workflow_id, _json_field(input, "input"), idempotency_key=idempotency_key or None
        )
        return handle.run_id, "started"

    return await _act(request, principal, "", go)


@router.post("/runs/{run_id}/cancel")
async def cancel(
    request: Request,
    run_id: str,
    principal: Actor,
    reason: Annotated[str, Form()] = "",
) -> Response:
    engine = http_state(request).engine

    async def go() -> tuple[str, str]:
        why = reason or f"cancelled from the dashboard by {principal.name}"
        if await engine.cancel(run_id, why):
            return run_id, "cancelled"
        return run_id, "nothing to cancel: the run had already ended"

    return await _act(request, principal, run_id, go)


@router.post("/runs/{run_id}/signal")
async def signal(
    request: Request,
    run_id: str,
    principal: Actor,
    name: Annotated[str, Form()],
    payload: Annotated[str, Form()] = "",
) -> Response:
    engine = http_state(request).engine

    async def go() -> tuple[str, str]:
        await engine.signal(run_id, name, _json_field(payload, "payload"))
        return run_id, f"signal {name} sent"

    return await _act(request, principal, run_id, go)


@router.post("/runs/{run_id}/rerun")
async def rerun(
    request: Request, run_id: str, principal: Actor, stage_id: Annotated[str, Form()]
) -> Response:
    engine = http_state(request).engine

    async def go() -> tuple[str, str]:
        await engine.rerun_from(run_id, stage_id)
        return run_id, f"re-running from {stage_id}"

    return await _act(request, principal, run_id, go)


@router.post("/runs/{run_id}/fork")
async def fork(
    request: Request, run_id: str, principal: Actor, from_step: Annotated[str, Form()]
) -> Response:
    engine = http_state(request).engine

    async def go() -> tuple[str, str]:
        forked = await engine.fork(run_id, from_step)
        return forked.run_id, f"forked from {run_id} at {from_step}"

    return await _act(request, principal, run_id, go)


@router.post("/runs/{run_id}/review")
async def decide(
    request: Request,
    run_id: str,
    principal: Actor,
    review_id: Annotated[str, Form()],
    decision: Annotated[str, Form()],
    comment: Annotated[str, Form()] = "",
    back: Annotated[str, Form()] = "",
) -> Response:
    engine = http_state(request).engine

    async def go() -> tuple[str, str]:
        if decision not in ("approved", "rejected"):
            raise invalid("decision", f"must be 'approved' or 'rejected', got {decision!r}")
        recorded = await engine.decide_review(
            run_id,
            review_id,
            "approved" if decision == "approved" else "rejected",
            reviewer=principal.name,
            comment=comment or None,
        )
        return run_id, decision if recorded else "nothing: the review was already decided"

    inbox = "/reviews" if back == "reviews" else ""
    return await _act(request, principal, run_id, go, back=inbox)


@router.post("/ui/dlq/replay")
async def replay_dlq(request: Request, principal: Actor) -> Response:
    engine = http_state(request).engine

    async def go() -> tuple[str, str]:
        replayed = await engine.outbox.replay_dead_letters(max_events=1_000)
        return "", f"{replayed} events put back in the outbox"

    return await _act(request, principal, "", go, back="/queues")
