"""``/healthz`` (the process answers) and ``/readyz`` (the database answers and its schema
is at the revision this release ships). Neither needs a token: a load balancer probes
them, and they reveal nothing but "ok" and the revision."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from treadle.hosts.http.state import http_state

__all__ = ["Health", "Readiness", "router"]

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    database: str
    """``ok``, or why the database is not usable."""
    backend: str
    schema_revision: str | None = None
    head_revision: str | None = None


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (no database round trip)."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    """The database answers and its schema is at head; 503 otherwise."""
    engine = http_state(request).engine
    backend = engine.backend
    kind = backend.kind if backend is not None else "custom"
    current = head = None
    problem: str | None = None
    try:
        await asyncio.wait_for(engine.list(limit=1), 5.0)
        if backend is not None and backend.kind != "memory":
            current, head = await asyncio.wait_for(_revisions(backend.persistence), 5.0)
            if current != head:
                problem = f"schema at revision {current or 'none'}, this release needs {head}"
    except TimeoutError:
        problem = "the database did not answer within 5 s"
    except Exception as exc:  # readiness reports any failure, it never raises
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    body = Readiness(
        status="unavailable" if problem else "ok",
        database=problem or "ok",
        backend=kind,
        schema_revision=current,
        head_revision=head,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if problem else 200)


async def _revisions(persistence: object) -> tuple[str | None, str]:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.ext.asyncio import AsyncEngine

    from treadle.adapters.sql.migrate import head_revision
    from treadle.adapters.sql.schema import VERSION_TABLE

    engine = getattr(persistence, "engine", None)
    if not isinstance(engine, AsyncEngine):
        return None, head_revision()

    def read(connection: object) -> str | None:
        context = MigrationContext.configure(
            connection,  # type: ignore[arg-type]  # a sync Connection (run_sync)
            opts={"version_table": VERSION_TABLE},
        )
        return context.get_current_revision()

    async with engine.connect() as connection:
        current = await connection.run_sync(read)
    return current, head_revision()
