"""FastAPI dependencies every router uses: the caller's ``Principal`` and the engine.

``Depends(require_read)`` / ``Depends(require_act)`` / ``Depends(require_scope("worker"))``
return the ``Principal`` or answer 401 (no or unknown credentials) / 403 (a token
without the scope, a read-only app, a failed CSRF check). ``Depends(get_engine)`` gives
the ``Engine``. See ``auth`` for how a request authenticates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request

from treadle.engine import Engine
from treadle.hosts.http.auth import OPEN_PRINCIPAL, SESSION_COOKIE, Principal, bearer_token
from treadle.hosts.http.csrf import CsrfError, verify_csrf
from treadle.hosts.http.state import http_state

__all__ = [
    "ApiError",
    "authenticate",
    "get_engine",
    "require_act",
    "require_read",
    "require_scope",
]

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ApiError(HTTPException):
    """An HTTP error with a Treadle-style ``code`` (rendered by ``errors``)."""

    def __init__(
        self, status_code: int, code: str, message: str, *, field: str | None = None
    ) -> None:
        headers = {"WWW-Authenticate": 'Bearer realm="treadle"'} if status_code == 401 else None
        super().__init__(status_code, message, headers=headers)
        self.code = code
        self.field = field


def authenticate(request: Request) -> Principal | None:
    """Who sent ``request``: a bearer token, else the session cookie; ``None`` when the
    credentials are missing or unknown. Under open access, everyone."""
    auth = http_state(request).auth
    if auth is None:
        return OPEN_PRINCIPAL
    token = bearer_token(request)
    if token is not None:
        return auth.authenticate(token) if token else None
    session = request.cookies.get(SESSION_COOKIE)
    return auth.session_principal(session) if session else None


def get_engine(request: Request) -> Engine:
    """The engine the app serves."""
    return http_state(request).engine


async def _check(request: Request, scope: str) -> Principal:
    principal = authenticate(request)
    if principal is None:
        why = "missing" if bearer_token(request) is None else "unknown"
        if why == "missing" and request.cookies.get(SESSION_COOKIE):
            why = "expired or invalid session"
        raise ApiError(401, "Unauthorized", f"authentication required ({why} credentials)")
    if not principal.has(scope):
        raise ApiError(403, "Forbidden", f"this token lacks the {scope!r} scope")
    if scope == "act" and http_state(request).read_only:
        raise ApiError(403, "ReadOnly", "this server is read-only: actions are disabled")
    if request.method not in _SAFE_METHODS and _needs_csrf(request, principal):
        try:
            await verify_csrf(request)
        except CsrfError as exc:
            raise ApiError(403, "CsrfFailed", str(exc), field="csrf_token") from None
    return principal


def _needs_csrf(request: Request, principal: Principal) -> bool:
    if principal.via == "bearer":
        return False
    if principal.via == "open":
        # A foreign page can post a form, but not JSON without a CORS preflight we refuse.
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        return media != "application/json"
    return True


async def require_read(request: Request) -> Principal:
    """The caller, who may read (scope ``read`` or ``act``)."""
    return await _check(request, "read")


async def require_act(request: Request) -> Principal:
    """The caller, who may act (scope ``act``, the app not read-only, CSRF checked)."""
    return await _check(request, "act")


def require_scope(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency for any scope, e.g. ``Depends(require_scope("worker"))``."""

    async def dependency(request: Request) -> Principal:
        return await _check(request, scope)

    dependency.__name__ = f"require_{scope}"
    return dependency
