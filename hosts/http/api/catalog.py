"""Everything around runs: registered workflows with their input JSON schemas, the
dead-letter queue (list, replay), cron schedules and named queues."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from treadle.engine import Engine
from treadle.hosts.http.api.models import DeadLetterOut, ReplayIn, ReplayOut, WorkflowOut
from treadle.hosts.http.deps import get_engine, require_act, require_read
from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import WorkflowNotFoundError
from treadle.kernel.model import QueueInfo
from treadle.kernel.schedules import Schedule

__all__ = ["router"]

router = APIRouter()
EngineDep = Annotated[Engine, Depends(get_engine)]


def _schema(wf: WorkflowDefinition) -> dict[str, Any]:
    try:
        schema = wf.input_adapter.json_schema()
    except Exception:  # a type pydantic cannot describe: say nothing rather than fail
        return {}
    return schema


def _workflow(wf: WorkflowDefinition) -> WorkflowOut:
    return WorkflowOut(
        id=wf.id,
        version=str(wf.version),
        kind=wf.kind,
        description=wf.description,
        input_schema=_schema(wf),
        stages=[stage.id for group in wf.groups for stage in group],
        queues=list(wf.queues),
    )


@router.get(
    "/workflows",
    response_model=list[WorkflowOut],
    tags=["workflows"],
    dependencies=[Depends(require_read)],
)
async def list_workflows(engine: EngineDep) -> list[WorkflowOut]:
    """The workflows this server's engine has registered, with input JSON schemas."""
    return [_workflow(wf) for wf in engine.workflows()]


@router.get(
    "/workflows/{workflow_id}",
    response_model=list[WorkflowOut],
    tags=["workflows"],
    dependencies=[Depends(require_read)],
)
async def get_workflow(engine: EngineDep, workflow_id: str) -> list[WorkflowOut]:
    """Every registered version of one workflow."""
    found = [_workflow(wf) for wf in engine.workflows() if wf.id == workflow_id]
    if not found:
        raise WorkflowNotFoundError(f"no workflow {workflow_id!r} is registered on this server")
    return found


@router.get(
    "/dlq",
    response_model=list[DeadLetterOut],
    tags=["dlq"],
    dependencies=[Depends(require_read)],
)
async def list_dead_letters(
    engine: EngineDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> list[DeadLetterOut]:
    """Events the outbox gave up publishing to the event sink, oldest first."""
    return [
        DeadLetterOut(
            id=record.id, attempts=record.attempts, last_error=record.last_error, event=record.event
        )
        for record in await engine.outbox.dead_letters(limit)
    ]


@router.post(
    "/dlq/replay",
    response_model=ReplayOut,
    tags=["dlq"],
    dependencies=[Depends(require_act)],
)
async def replay_dead_letters(engine: EngineDep, body: ReplayIn | None = None) -> ReplayOut:
    """Put dead-lettered events back in the outbox; the next flush publishes them."""
    count = body.max_events if body is not None else 100
    return ReplayOut(replayed=await engine.outbox.replay_dead_letters(count))


@router.get(
    "/schedules",
    response_model=list[Schedule],
    tags=["schedules"],
    dependencies=[Depends(require_read)],
)
async def list_schedules(
    engine: EngineDep, workflow_id: str | None = None, paused: bool | None = None
) -> list[Schedule]:
    """Cron schedules by id."""
    return await engine.schedules.list(workflow_id=workflow_id, paused=paused)


@router.get(
    "/queues",
    response_model=list[QueueInfo],
    tags=["queues"],
    dependencies=[Depends(require_read)],
)
async def list_queues(engine: EngineDep) -> list[QueueInfo]:
    """Named queues: due, scheduled and leased jobs, live workers, ``unserved``."""
    return await engine.queues()
