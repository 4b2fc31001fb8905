"""Acting on runs (scope ``act``): start, start-or-signal, signal, update, decide a
review, cancel, pause, resume, terminate, rerun-from and fork. Each is one ``Engine``
call, so it behaves exactly as the Python API and the CLI do."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from treadle.engine import Engine
from treadle.hosts.http.api.models import (
    ActionResult,
    DecideReviewIn,
    ForkIn,
    ReasonIn,
    RerunIn,
    RerunOut,
    SignalIn,
    SignalOut,
    StartIn,
    StartOrSignalIn,
    StartOut,
    UpdateIn,
    UpdateOut,
)
from treadle.hosts.http.auth import Principal
from treadle.hosts.http.deps import get_engine, require_act
from treadle.hosts.http.errors import ErrorBody

__all__ = ["router"]

_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "No such run (or workflow)"},
    409: {"model": ErrorBody, "description": "The run's state does not allow this"},
    422: {"model": ErrorBody, "description": "A field is invalid (named in the error)"},
}

router = APIRouter(tags=["actions"], responses=_ERRORS)

EngineDep = Annotated[Engine, Depends(get_engine)]
Caller = Annotated[Principal, Depends(require_act)]


async def _started(
    engine: Engine, run_id: str, created: bool | None, response: Response
) -> StartOut:
    run = await engine.get_run(run_id, with_stages=False)
    response.headers["Location"] = f"runs/{run_id}"
    response.status_code = 201 if created is not False else 200
    return StartOut(run_id=run_id, status=run.status, created=created is not False)


@router.post("/runs", response_model=StartOut, status_code=201)
async def start_run(body: StartIn, engine: EngineDep, _: Caller, response: Response) -> StartOut:
    """Start a run (201); with an ``idempotency_key`` that started one already, that
    run (200, ``created: false``)."""
    handle = await engine.start(
        body.workflow_id,
        body.input,
        idempotency_key=body.idempotency_key,
        priority=body.priority,
        config=body.config,
        run_id=body.run_id,
        search_attributes=body.search_attributes,
        execution_timeout=body.execution_timeout,
        concurrency_key=body.concurrency_key,
    )
    return await _started(engine, handle.run_id, handle.created, response)


@router.post("/runs/start-or-signal", response_model=StartOut, status_code=201)
async def start_or_signal(
    body: StartOrSignalIn, engine: EngineDep, _: Caller, response: Response
) -> StartOut:
    """Signal the run with this idempotency key, starting it first if there is none."""
    handle = await engine.start_or_signal(
        body.workflow_id,
        body.input,
        body.signal,
        body.payload,
        idempotency_key=body.idempotency_key,
        priority=body.priority,
        config=body.config,
        search_attributes=body.search_attributes,
    )
    return await _started(engine, handle.run_id, handle.created, response)


@router.post("/runs/{run_id}/signal", response_model=SignalOut)
async def signal_run(run_id: str, body: SignalIn, engine: EngineDep, _: Caller) -> SignalOut:
    """Deliver a signal to a code workflow's inbox."""
    delivered = await engine.signal(
        run_id, body.name, body.payload, idempotency_key=body.idempotency_key
    )
    return SignalOut(delivered=delivered)


@router.post(
    "/runs/{run_id}/update",
    response_model=UpdateOut,
    responses={504: {"model": ErrorBody, "description": "No reply within timeout"}},
)
async def update_run(run_id: str, body: UpdateIn, engine: EngineDep, _: Caller) -> UpdateOut:
    """Send an update and wait (up to ``timeout`` seconds) for the workflow's reply."""
    reply = await engine.update(
        run_id, body.name, body.payload, timeout=body.timeout, idempotency_key=body.idempotency_key
    )
    return UpdateOut(reply=reply)


@router.post("/runs/{run_id}/reviews/{review_id}", response_model=SignalOut)
async def decide_review(
    run_id: str, review_id: str, body: DecideReviewIn, engine: EngineDep, caller: Caller
) -> SignalOut:
    """Record a reviewer's decision (``approved`` / ``rejected``) and wake the run."""
    recorded = await engine.decide_review(
        run_id,
        review_id,
        body.decision,
        reviewer=body.reviewer or caller.name,
        comment=body.comment,
        idempotency_key=body.idempotency_key,
    )
    return SignalOut(delivered=recorded)


async def _steer(engine: Engine, action: str, run_id: str, body: ReasonIn | None) -> ActionResult:
    method = {
        "cancel": engine.cancel,
        "pause": engine.pause,
        "resume": engine.resume,
        "terminate": engine.terminate,
    }[action]
    changed = await method(run_id, reason=body.reason if body is not None else None)
    return ActionResult(run_id=run_id, action=action, changed=changed)


@router.post("/runs/{run_id}/cancel", response_model=ActionResult)
async def cancel_run(
    run_id: str, engine: EngineDep, _: Caller, body: ReasonIn | None = None
) -> ActionResult:
    """Cancel the run (its saga compensations run); ``changed: false`` if it had ended."""
    return await _steer(engine, "cancel", run_id, body)


@router.post("/runs/{run_id}/pause", response_model=ActionResult)
async def pause_run(
    run_id: str, engine: EngineDep, _: Caller, body: ReasonIn | None = None
) -> ActionResult:
    """Start no new stage or step until resumed; 409 if the run has ended."""
    return await _steer(engine, "pause", run_id, body)


@router.post("/runs/{run_id}/resume", response_model=ActionResult)
async def resume_run(
    run_id: str, engine: EngineDep, _: Caller, body: ReasonIn | None = None
) -> ActionResult:
    """Go on with a paused run."""
    return await _steer(engine, "resume", run_id, body)


@router.post("/runs/{run_id}/terminate", response_model=ActionResult)
async def terminate_run(
    run_id: str, engine: EngineDep, _: Caller, body: ReasonIn | None = None
) -> ActionResult:
    """End the run at once, without compensations."""
    return await _steer(engine, "terminate", run_id, body)


@router.post("/runs/{run_id}/rerun", response_model=RerunOut)
async def rerun_from(run_id: str, body: RerunIn, engine: EngineDep, _: Caller) -> RerunOut:
    """Reset ``stage_id`` and every later stage of a finished run and run them again."""
    result = await engine.rerun_from(run_id, body.stage_id, config=body.config)
    return RerunOut(
        run_id=result.workflow_run_id,
        from_stage_id=result.from_stage_id,
        deleted_stages=list(result.deleted_stages),
    )


@router.post("/runs/{run_id}/fork", response_model=StartOut, status_code=201)
async def fork_run(
    run_id: str, body: ForkIn, engine: EngineDep, _: Caller, response: Response
) -> StartOut:
    """A new run of a code workflow reusing this run's journal before ``from_step``."""
    handle = await engine.fork(run_id, body.from_step, idempotency_key=body.idempotency_key)
    return await _started(engine, handle.run_id, True, response)
