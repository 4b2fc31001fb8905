"""The runs table: its filters (from the query string) and what it shows."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from starlette.datastructures import QueryParams

from treadle.kernel.errors import TreadleError
from treadle.kernel.model import RunStatus

if TYPE_CHECKING:
    from treadle.engine import Engine

__all__ = ["PAGE_SIZE", "SINCE", "parse_filters", "query_string", "runs_table", "workflow_ids"]

PAGE_SIZE: Final = 50
SINCE: Final = {
    "1h": timedelta(hours=1),
    "24h": timedelta(days=1),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
"""The runs page's ``since`` choices: runs created within that long."""


def parse_filters(params: QueryParams) -> tuple[dict[str, Any], list[str]]:
    """The runs page's filters from the query string: ``status`` (repeated),
    ``workflow_id``, ``attr`` (``key=value``, the value JSON or text), ``page``."""
    problems: list[str] = []
    statuses = [s.upper() for s in params.getlist("status") if s]
    valid = {s.value for s in RunStatus}
    bad = [s for s in statuses if s not in valid]
    if bad:
        problems.append(f"status: unknown {', '.join(bad)}")
    statuses = [s for s in statuses if s in valid]
    attributes: dict[str, Any] = {}
    raw_attr = params.get("attr", "") or ""
    if raw_attr.strip():
        key, sep, value = raw_attr.partition("=")
        if not sep or not key.strip():
            problems.append("attr: must be key=value")
        else:
            try:
                attributes[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                attributes[key.strip()] = value
    since = params.get("since", "") or ""
    if since and since not in SINCE:
        problems.append(f"since: must be one of {', '.join(SINCE)}")
        since = ""
    try:
        page = max(int(params.get("page", "0") or 0), 0)
    except ValueError:
        problems.append("page: must be a number")
        page = 0
    return {
        "status": statuses,
        "workflow_id": (params.get("workflow_id") or "").strip() or None,
        "attr": raw_attr.strip(),
        "attributes": attributes,
        "since": since,
        "page": page,
    }, problems


def query_string(filters: Mapping[str, Any]) -> str:
    pairs: list[tuple[str, str]] = [("status", s) for s in filters["status"]]
    if filters["workflow_id"]:
        pairs.append(("workflow_id", filters["workflow_id"]))
    if filters["attr"]:
        pairs.append(("attr", filters["attr"]))
    if filters["since"]:
        pairs.append(("since", filters["since"]))
    return urllib.parse.urlencode(pairs)


async def runs_table(
    engine: Engine, filters: Mapping[str, Any], problems: list[str]
) -> dict[str, Any]:
    since = SINCE.get(filters["since"])
    common = {
        "workflow_id": filters["workflow_id"],
        "attributes": filters["attributes"] or None,
        "created_after": datetime.now(UTC) - since if since is not None else None,
    }
    try:
        runs = await engine.list(
            status=filters["status"] or None,
            limit=PAGE_SIZE + 1,
            offset=filters["page"] * PAGE_SIZE,
            **common,
        )
        counts = await engine.aggregate("status", **common)
    except TreadleError as exc:
        problems = [*problems, str(exc)]
        runs, counts = [], {}
    return {
        "runs": runs[:PAGE_SIZE],
        "more": len(runs) > PAGE_SIZE,
        "page": filters["page"],
        "counts": counts,
        "costs": any(r.total_cost or r.total_tokens for r in runs[:PAGE_SIZE]),
        "total": sum(counts.values()),
        "filters": filters,
        "problems": problems,
    }


def workflow_ids(engine: Engine) -> list[str]:
    """The ids of the registered workflows (the filter's and the start form's choices)."""
    return sorted({wf.id for wf in engine.workflows()})
