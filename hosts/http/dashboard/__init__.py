"""The web dashboard of ``treadle serve`` (issue 15, item 4), served at ``/``.

Server-rendered pages (Jinja2 with autoescape, htmx for the live parts, no JavaScript
build step): the runs table with counts by status, the run page (an SVG Gantt chart of
its stages or journal, input / output / error with traceback, live events, actions with
a confirmation), the review inbox, queues and workers, and the throughput of the last
hour. ``create_app`` mounts it through ``mount`` (see ``treadle.hosts.http.app``).
The charts are pure functions importable without FastAPI; the routes load on ``mount``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from treadle.hosts.http.dashboard.charts import (
    journal_rows,
    render_gantt,
    render_throughput,
    stage_rows,
    throughput_buckets,
)

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI

    from treadle.hosts.http.state import HttpState

__all__ = [
    "dashboard_router",
    "journal_rows",
    "mount",
    "render_gantt",
    "render_throughput",
    "stage_rows",
    "throughput_buckets",
]


def dashboard_router() -> APIRouter:
    """The dashboard's routes as a FastAPI ``APIRouter`` (it owns ``/``): the pages,
    their live streams and static files (``pages``), and the actions (``actions``).
    They read the engine and auth of the app that includes them (``HttpState``)."""
    from fastapi import APIRouter

    from treadle.hosts.http.dashboard import actions, pages

    router = APIRouter(include_in_schema=False)
    router.include_router(pages.router)
    router.include_router(actions.router)
    return router


def mount(app: FastAPI, state: HttpState) -> None:
    """Include the dashboard in ``app`` (called by ``create_app``, after the API), with
    its templates loaded once for this app."""
    from treadle.hosts.http.dashboard.render import keep_templates

    keep_templates(state)
    app.include_router(dashboard_router())
