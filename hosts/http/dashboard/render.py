"""How the dashboard renders: its Jinja2 environment (autoescape always on), the
context every page gets, and who may see a page.

The environment is made once per app (kept in ``HttpState.extras``), so templates are
parsed once and nothing is built at import.
"""

from __future__ import annotations

import json
import urllib.parse
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from treadle.hosts.http.csrf import CSRF_FIELD, csrf_token
from treadle.hosts.http.dashboard.data import pretty
from treadle.hosts.http.deps import authenticate
from treadle.hosts.http.state import http_state
from treadle.kernel.model import RunStatus

if TYPE_CHECKING:
    from treadle.hosts.http.auth import Principal
    from treadle.hosts.http.state import HttpState
    from treadle.kernel.events import EventBase

__all__ = [
    "environment",
    "event_row",
    "keep_templates",
    "login_url",
    "render",
    "root",
    "templates",
    "viewer",
]

_ENV_KEY: Final = "dashboard.templates"


def templates() -> jinja2.Environment:
    """A Jinja2 environment on the package's templates, autoescape always on, undefined
    names an error (a typo in a template fails its test instead of rendering blank)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("treadle.hosts.http", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pretty"] = pretty
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.filters["cost"] = _cost
    return env


def keep_templates(state: HttpState) -> jinja2.Environment:
    """The app's environment, kept in its ``HttpState`` (made on first use)."""
    env = state.extras.get(_ENV_KEY)
    if not isinstance(env, jinja2.Environment):
        env = state.extras[_ENV_KEY] = templates()
    return env


def environment(request: Request) -> jinja2.Environment:
    """The environment of the app serving ``request``."""
    return keep_templates(http_state(request))


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return ""
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    if seconds < 0:
        return f"in {_span(-seconds)}"
    return f"{_span(seconds)} ago"


def _cost(amount: Decimal) -> str:
    """``$0.0123`` (four decimals; exact figures are in ``treadle costs`` and the API)."""
    return f"${amount:.4f}"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def root(request: Request) -> str:
    """The path the app is mounted at (``""`` at the site's root)."""
    root = request.scope.get("root_path", "")
    return root if isinstance(root, str) else ""


def render(
    request: Request, name: str, principal: Principal, status: int = 200, **context: Any
) -> HTMLResponse:
    """Template ``name`` with the context every page uses: the mount path, the CSRF
    token, whether the caller may act (``act`` scope on an app that is not read-only)."""
    state = http_state(request)
    page = (
        environment(request)
        .get_template(name)
        .render(
            request=request,
            root=root(request),
            csrf_field=CSRF_FIELD,
            csrf=csrf_token(request),
            can_act=principal.has("act") and not state.read_only,
            read_only=state.read_only,
            principal=principal,
            signed_in=principal.via == "session",
            now=datetime.now(UTC),
            statuses=[s.value for s in RunStatus],
            **context,
        )
    )
    return HTMLResponse(page, status_code=status)


def viewer(request: Request) -> Principal | Response:
    """The caller if it may read; otherwise a redirect to ``/login`` (for htmx, a 401
    with ``HX-Redirect`` so the whole page goes there)."""
    principal = authenticate(request)
    if principal is not None and principal.has("read"):
        return principal
    if request.headers.get("hx-request"):
        return Response(status_code=401, headers={"HX-Redirect": login_url(request)})
    return RedirectResponse(login_url(request), status_code=303)


def login_url(request: Request) -> str:
    """``/login`` with ``next`` set to the page asked for."""
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    if request.headers.get("hx-request"):
        target = request.headers.get("hx-current-url", target)
        target = urllib.parse.urlsplit(target).path or "/"
    return f"{root(request)}/login?next={urllib.parse.quote(target)}"


def event_row(event: EventBase) -> dict[str, Any]:
    """How the events table shows one event: its fields other than the common ones and
    a traceback (the run page shows that in the error box), as text (escaped by the
    template)."""
    fields = event.model_dump(
        mode="json",
        exclude={"type", "workflow_run_id", "sequence", "causation_id", "timestamp", "traceback"},
    )
    detail = ", ".join(
        f"{k}={json.dumps(v, ensure_ascii=False)}"
        for k, v in fields.items()
        if v not in (None, [], {})
    )
    kind = getattr(event, "type", "event")
    tone = (
        "bad"
        if kind.endswith(("failed", "cancelled", "terminated"))
        else "good"
        if kind.endswith("completed")
        else ""
    )
    return {
        "sequence": event.sequence,
        "type": kind,
        "timestamp": event.timestamp,
        "detail": detail if len(detail) <= 600 else detail[:599] + "…",
        "tone": tone,
    }
