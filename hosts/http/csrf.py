"""CSRF protection for the dashboard's forms and htmx actions.

A browser authenticates with a cookie (see ``auth``), so a page on another site could
make it send a form to us. Every state-changing request that is not authenticated by an
``Authorization: Bearer`` header must therefore present a CSRF token, which only our
own pages can know:

- ``CsrfCookieMiddleware`` gives each browser a random ``treadle_csrf`` cookie
  (``HttpOnly``, ``SameSite=Strict``) on its first response;
- ``csrf_token(request)`` is the token a page embeds: an HMAC, under the app's secret,
  of that cookie and of the session cookie (so a token is bound to one browser and one
  login, and is useless without both cookies). The dashboard calls it when rendering:
  ``<input type="hidden" name="csrf_token" value="{{ csrf_token(request) }}">`` in
  forms, or ``hx-headers='{"X-CSRF-Token": "..."}'`` on htmx elements;
- ``verify_csrf(request)`` checks the ``X-CSRF-Token`` header or the ``csrf_token``
  form field against it and raises a 403 (``CsrfFailed``) otherwise. ``require_act``
  calls it for every cookie-authenticated (or, under open access, non-JSON) unsafe
  request, so a route that depends on ``require_act`` is protected without more code.

Under open access (``auth=None``) a cross-site ``fetch`` with ``Content-Type:
application/json`` needs a CORS preflight, which this app never grants, so JSON API
calls need no CSRF token there; form posts (which a foreign page can send) do.
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING, Final

from treadle.hosts.http.auth import SESSION_COOKIE

if TYPE_CHECKING:
    from fastapi import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "CsrfCookieMiddleware",
    "CsrfError",
    "csrf_token",
    "verify_csrf",
]

CSRF_COOKIE: Final = "treadle_csrf"
CSRF_HEADER: Final = "x-csrf-token"
CSRF_FIELD: Final = "csrf_token"
_SCOPE_KEY: Final = "treadle.csrf_nonce"


class CsrfError(Exception):
    """A state-changing request without a valid CSRF token (answered 403)."""


def _nonce(request: Request) -> str | None:
    fresh = request.scope.get(_SCOPE_KEY)
    return request.cookies.get(CSRF_COOKIE) or (fresh if isinstance(fresh, str) else None)


def _expected(request: Request, nonce: str) -> str:
    from treadle.hosts.http.state import http_state

    secret = http_state(request).secret
    session = request.cookies.get(SESSION_COOKIE, "")
    return hmac.new(secret, f"csrf:{nonce}|{session}".encode(), "sha256").hexdigest()


def csrf_token(request: Request) -> str:
    """The CSRF token to embed in a page served for ``request`` (see the module docs)."""
    nonce = _nonce(request)
    if nonce is None:  # not behind CsrfCookieMiddleware: no cookie to bind to
        raise CsrfError("no CSRF cookie: the app is missing CsrfCookieMiddleware")
    return _expected(request, nonce)


async def verify_csrf(request: Request) -> None:
    """Raise ``CsrfError`` unless the request carries the right CSRF token, in the
    ``X-CSRF-Token`` header or the ``csrf_token`` form field."""
    nonce = request.cookies.get(CSRF_COOKIE)
    if not nonce:
        raise CsrfError("CSRF check failed: no CSRF cookie (load a page of this app first)")
    presented = request.headers.get(CSRF_HEADER)
    if presented is None:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()  # Starlette caches it for the route's own Form fields
            value = form.get(CSRF_FIELD)
            presented = value if isinstance(value, str) else None
    if not presented or not hmac.compare_digest(presented, _expected(request, nonce)):
        raise CsrfError("CSRF check failed: missing or wrong CSRF token")


class CsrfCookieMiddleware:
    """Sets the ``treadle_csrf`` cookie on the response to a request that has none (API
    clients ignore it; a page served to a bearer request can still embed a token)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _has_cookie(scope):
            await self.app(scope, receive, send)
            return
        nonce = os.urandom(16).hex()
        scope[_SCOPE_KEY] = nonce
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = f"{CSRF_COOKIE}={nonce}; Path=/; HttpOnly; SameSite=Strict{secure}"

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"set-cookie", cookie.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _has_cookie(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"cookie" and f"{CSRF_COOKIE}=".encode() in value:
            return True
    return False
