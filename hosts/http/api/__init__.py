"""The JSON API under ``/api/v1`` (see docs/http-api.md): ``runs`` (reads), ``actions``
(scope ``act``), ``stream`` (SSE), ``catalog`` (workflows, DLQ, schedules, queues)."""

from fastapi import APIRouter

from treadle.hosts.http.api import actions, catalog, runs, stream

__all__ = ["API_PREFIX", "router"]

API_PREFIX = "/api/v1"

router = APIRouter(prefix=API_PREFIX)
router.include_router(runs.router)
router.include_router(actions.router)
router.include_router(stream.router)
router.include_router(catalog.router)
