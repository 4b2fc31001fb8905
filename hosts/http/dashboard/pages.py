"""The dashboard's pages (GET): runs, a run, the review inbox, queues and workers,
throughput; the htmx partials and SSE streams of their live parts; the static files.

Each page needs a principal that may read (``render.viewer``); a browser without a
session is sent to ``/login``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Final

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup

from treadle.hosts.http.dashboard import data, runs, streams
from treadle.hosts.http.dashboard.charts import render_throughput
from treadle.hosts.http.dashboard.render import environment, event_row, render, root, viewer
from treadle.hosts.http.state import http_state
from treadle.kernel.errors import RunNotFoundError

if TYPE_CHECKING:
    from treadle.kernel.events import EventBase

__all__ = ["EVENTS_SHOWN", "STATIC_FILES", "router"]

router = APIRouter(include_in_schema=False)

STATIC_FILES: Final = {
    "htmx.min.js": "text/javascript",
    "htmx-ext-sse.min.js": "text/javascript",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
"""The files under ``/static/`` (shipped in the wheel as package data)."""

EVENTS_SHOWN: Final = 500
"""The run page lists a run's newest events up to this many (the timeline uses all)."""


@router.get("/", response_class=HTMLResponse)
async def runs_page(request: Request) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    engine = http_state(request).engine
    filters, problems = runs.parse_filters(request.query_params)
    table = await runs.runs_table(engine, filters, problems)
    return render(
        request,
        "runs.html",
        who,
        active="runs",
        workflows=runs.workflow_ids(engine),
        query=runs.query_string(filters),
        **table,
    )


@router.get("/ui/runs-table", response_class=HTMLResponse)
async def runs_table(request: Request) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    filters, problems = runs.parse_filters(request.query_params)
    table = await runs.runs_table(http_state(request).engine, filters, problems)
    return render(request, "_runs_table.html", who, query=runs.query_string(filters), **table)


@router.get("/ui/stream")
async def runs_stream(request: Request) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    return streams.sse(request, streams.runs_change_stream(streams.hub_for(request)))


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run_detail(request: Request, run_id: str) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    try:
        page = await data.run_page(http_state(request).engine, run_id, now=datetime.now(UTC))
    except RunNotFoundError as exc:
        return render(request, "error.html", who, status=404, error=exc)
    return render(
        request,
        "run.html",
        who,
        active="runs",
        page=page,
        gantt=Markup(page.gantt),  # SVG from charts.py: its texts are escaped there
        last_sequence=max((e.sequence for e in page.events), default=0),
        event_rows=[event_row(e) for e in page.events[-EVENTS_SHOWN:]],
        events_hidden=max(len(page.events) - EVENTS_SHOWN, 0),
        message=request.query_params.get("done", ""),
    )


@router.get("/runs/{run_id}/panel", response_class=HTMLResponse)
async def run_panel(request: Request, run_id: str) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    page = await data.run_page(http_state(request).engine, run_id, now=datetime.now(UTC))
    return render(
        request,
        "_run_panel.html",
        who,
        page=page,
        gantt=Markup(page.gantt),  # SVG from charts.py: its texts are escaped there
    )


@router.get("/runs/{run_id}/stream")
async def run_stream(request: Request, run_id: str) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    engine = http_state(request).engine
    await engine.get_run(run_id, with_stages=False)
    template = environment(request).get_template("_event_row.html")
    mount = root(request)

    def fragment(event: EventBase) -> str:
        return template.render(row=event_row(event), root=mount)

    after = streams.last_event_id(request)
    hub = streams.hub_for(request)
    return streams.sse(request, streams.run_event_stream(hub, engine, run_id, after, fragment))


@router.get("/reviews", response_class=HTMLResponse)
async def reviews(request: Request) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    found = await data.pending_reviews(http_state(request).engine)
    return render(
        request,
        "reviews.html",
        who,
        active="reviews",
        back="reviews",
        reviews=found,
        message=request.query_params.get("done", ""),
    )


@router.get("/queues", response_class=HTMLResponse)
async def queues(request: Request) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    page = await data.queues_page(http_state(request).engine)
    return render(
        request,
        "queues.html",
        who,
        active="queues",
        page=page,
        message=request.query_params.get("done", ""),
    )


@router.get("/throughput", response_class=HTMLResponse)
async def throughput(request: Request) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    buckets, capped = await data.throughput(http_state(request).engine, now=datetime.now(UTC))
    return render(
        request,
        "throughput.html",
        who,
        active="throughput",
        chart=Markup(render_throughput(buckets)),  # numbers and escaped labels only
        completed=sum(b.completed for b in buckets),
        failed=sum(b.failed for b in buckets),
        capped=capped,
    )


@router.get("/static/{name}")
async def static(name: str) -> Response:
    media = STATIC_FILES.get(name)
    if media is None:
        return Response("not found", status_code=404, media_type="text/plain")
    body = resources.files("treadle.hosts.http").joinpath("static", name).read_bytes()
    return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=3600"})
