"""Reading runs: ``GET /api/v1/runs`` (filters, cursor pages), ``/runs/aggregate``,
``/runs/{id}`` (stages, journal, timers), ``/runs/{id}/annotations``, ``/runs/{id}/logs``
and ``/runs/{id}/query/{name}``."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from treadle.engine import Engine
from treadle.hosts.http.api.models import AggregateOut, QueryOut, RunDetail, RunPage, RunSummary
from treadle.hosts.http.deps import get_engine, require_read
from treadle.kernel.arguments import invalid
from treadle.kernel.model import Annotation, JsonValue, LogRecord

__all__ = ["decode_cursor", "encode_cursor", "router"]

router = APIRouter(tags=["runs"], dependencies=[Depends(require_read)])

EngineDep = Annotated[Engine, Depends(get_engine)]
MAX_PAGE = 500


def encode_cursor(created_at: datetime, run_id: str) -> str:
    """An opaque page cursor: the last run's ``(created_at, id)``."""
    raw = json.dumps([created_at.isoformat(), run_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, run_id = json.loads(raw)
        parsed = datetime.fromisoformat(when)
        if not isinstance(run_id, str) or not run_id or parsed.tzinfo is None:
            raise ValueError(cursor)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise invalid("cursor", "is not a cursor this API returned") from None
    return parsed, run_id


def _statuses(values: list[str] | None) -> list[str] | None:
    """``status=FAILED&status=CANCELLED`` or ``status=FAILED,CANCELLED``."""
    if not values:
        return None
    found = [part.strip() for value in values for part in value.split(",") if part.strip()]
    return found or None


def parse_attributes(values: list[str] | None) -> dict[str, JsonValue] | None:
    """``attribute=key:value`` (repeatable): ``value`` as JSON when it parses (``3``,
    ``true``, ``"3"``), else as a string."""
    if not values:
        return None
    found: dict[str, JsonValue] = {}
    for index, item in enumerate(values):
        key, sep, text = item.partition(":")
        if not sep or not key.strip():
            raise invalid(f"attribute[{index}]", f"must be 'key:value', got {item!r}")
        try:
            value: JsonValue = json.loads(text)
        except ValueError:
            value = text
        found[key.strip()] = value
    return found


class RunQuery:
    """The filters ``GET /runs`` and ``GET /runs/aggregate`` share."""

    def __init__(
        self,
        status: Annotated[
            list[str] | None,
            Query(
                description="PENDING, RUNNING, SUSPENDED, COMPLETED, FAILED, CANCELLED; "
                "repeat or comma-separate for any of several"
            ),
        ] = None,
        workflow_id: str | None = None,
        created_after: Annotated[datetime | None, Query(description="Inclusive.")] = None,
        created_before: Annotated[datetime | None, Query(description="Exclusive.")] = None,
        updated_after: Annotated[datetime | None, Query(description="Inclusive.")] = None,
        updated_before: Annotated[datetime | None, Query(description="Exclusive.")] = None,
        attribute: Annotated[
            list[str] | None,
            Query(
                description="Search attribute 'key:value' (value parsed as JSON when it "
                "is JSON); repeat for several, all must match"
            ),
        ] = None,
    ) -> None:
        self.filters: dict[str, Any] = {
            "status": _statuses(status),
            "workflow_id": workflow_id,
            "created_after": created_after,
            "created_before": created_before,
            "updated_after": updated_after,
            "updated_before": updated_before,
            "attributes": parse_attributes(attribute),
        }


@router.get("/runs", response_model=RunPage)
async def list_runs(
    engine: EngineDep,
    query: Annotated[RunQuery, Depends()],
    parent_run_id: str | None = None,
    paused: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> RunPage:
    """Runs matching every filter, newest first, a page at a time."""
    after = decode_cursor(cursor) if cursor else None
    runs = await engine.list(
        **query.filters,
        limit=limit + 1,
        parent_run_id=parent_run_id,
        paused=paused,
        after=after,
        payloads=False,  # a summary shows neither: no blob fetch per listed run
    )
    more = len(runs) > limit
    runs = runs[:limit]
    next_cursor = encode_cursor(runs[-1].created_at, runs[-1].id) if more and runs else None
    return RunPage(runs=[RunSummary.of(run) for run in runs], next_cursor=next_cursor)


@router.get("/runs/aggregate", response_model=AggregateOut)
async def aggregate_runs(
    engine: EngineDep,
    query: Annotated[RunQuery, Depends()],
    by: Literal["status", "workflow_id"] = "status",
) -> AggregateOut:
    """Run counts per status (or per workflow) over the filtered runs."""
    counts = await engine.aggregate(by, **query.filters)
    return AggregateOut(by=by, counts=counts, total=sum(counts.values()))


@router.get("/runs/{run_id}", response_model=RunDetail)
async def get_run(engine: EngineDep, run_id: str) -> RunDetail:
    """One run with its stages; a code workflow's journal and pending timers too."""
    run = await engine.get_run(run_id)
    definition = next(
        (
            wf
            for wf in engine.workflows()
            if wf.id == run.workflow_id and str(wf.version) == run.workflow_version
        ),
        None,
    )
    kind = definition.kind if definition is not None else None
    journal = await engine.journal(run_id) if kind != "pipeline" else []
    timers = await engine.timers(run_id) if journal else []
    summary = RunSummary.of(run).model_dump()
    return RunDetail(
        **summary,
        input=run.input,
        output=run.output,
        config=run.config,
        worker_id=run.worker_id,
        terminated=run.terminated,
        continued_from=run.continued_from,
        continued_as=run.continued_as,
        kind=kind,
        stages=run.stages,
        journal=journal,
        timers=timers,
    )


@router.get("/runs/{run_id}/annotations", response_model=list[Annotation])
async def run_annotations(
    engine: EngineDep,
    run_id: str,
    key: str | None = None,
    key_prefix: str | None = None,
    scope: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[Annotation]:
    """The run's provenance records (``annotate``), oldest first."""
    await engine.get_run(run_id, with_stages=False)
    return await engine.annotations(
        run_id, key=key, key_prefix=key_prefix, scope=scope, limit=limit
    )


@router.get("/runs/{run_id}/logs", response_model=list[LogRecord])
async def run_logs(engine: EngineDep, run_id: str) -> list[LogRecord]:
    """Lines the run's stages wrote with ``ctx.log``, in order."""
    await engine.get_run(run_id, with_stages=False)
    return await engine.logs(run_id)


@router.get("/runs/{run_id}/query/{name}", response_model=QueryOut)
async def query_run(engine: EngineDep, run_id: str, name: str) -> QueryOut:
    """State a code workflow published with ``ctx.publish(name, value)``; read-only."""
    return QueryOut(name=name, value=await engine.query(run_id, name))
