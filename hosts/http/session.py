"""``/login`` and ``/logout``: how a browser gets the session cookie (see ``auth``).

``GET /login`` shows a one-field form; ``POST /login`` with a valid token (and the CSRF
token, so a foreign page cannot log a browser in as someone else) sets
``treadle_session`` and redirects to ``next`` (a local path only). ``POST /logout``
clears it. Under open access there is nothing to log into: both redirect to ``/``.
"""

from __future__ import annotations

import html
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from treadle.hosts.http.auth import SESSION_COOKIE, SESSION_TTL
from treadle.hosts.http.csrf import CSRF_FIELD, CsrfError, csrf_token, verify_csrf
from treadle.hosts.http.state import http_state

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


def _safe_next(value: str | None) -> str:
    """Only a path on this site (no ``//host``, no scheme): no open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _page(request: Request, next_path: str, message: str = "", status: int = 200) -> HTMLResponse:
    token = html.escape(csrf_token(request))
    note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    root = html.escape(request.scope.get("root_path", ""))
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Treadle: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><main><h1>Treadle</h1>{note}
<form method="post" action="{root}/login">
<input type="hidden" name="{CSRF_FIELD}" value="{token}">
<input type="hidden" name="next" value="{html.escape(next_path)}">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
</form></main></body></html>"""
    return HTMLResponse(body, status_code=status)


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    if http_state(request).auth is None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _page(request, _safe_next(next))


@router.post("/login")
async def login(
    request: Request,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    state = http_state(request)
    target = _safe_next(next)
    if state.auth is None:
        return RedirectResponse(target, status_code=303)
    try:
        await verify_csrf(request)
    except CsrfError:
        return _page(request, target, "Your form expired; please try again.", status=403)
    principal = state.auth.authenticate(token.strip())
    if principal is None or not (principal.has("read") or principal.has("act")):
        return _page(request, target, "Unknown token.", status=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        state.auth.issue_session(principal),
        max_age=int(SESSION_TTL),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    try:
        await verify_csrf(request)
    except CsrfError:
        return HTMLResponse("CSRF check failed", status_code=403)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
