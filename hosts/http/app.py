"""``create_app(engine, ...)``: the ASGI application behind ``treadle serve``.

A FastAPI app that serves one ``Engine``. Mount it inside your own app
(``your_app.mount("/treadle", create_app(engine, auth=...))``) or run it with
``treadle serve``. The engine stays yours: the app never opens or closes it.

What the app holds, in the order requests meet it:

1. ``BodyLimitMiddleware`` (413 past ``max_body_bytes``), ``SecurityHeadersMiddleware``
   (``nosniff``, no framing), then ``CsrfCookieMiddleware`` (the browser's CSRF
   cookie; see ``csrf``);
2. routers: ``health`` (``/healthz``, ``/readyz``), ``session`` (``/login``,
   ``/logout``), ``api`` (the JSON API under ``/api/v1``, SSE included), the
   ``routers=`` you pass, then the optional modules of ``OPTIONAL_MODULES``;
3. ``errors``: every error as JSON ``{"error": {code, message, field, errors}}``.

**Adding a router.** A module of this package named in ``OPTIONAL_MODULES``
(``workers``, ``metrics``, ``dashboard``) is mounted when it exists: it defines
``mount(app: FastAPI, state: HttpState) -> None``, which calls
``app.include_router(...)`` (or ``app.mount``) and may keep per-app objects in
``state.extras``. Routes protect themselves with ``Depends(require_read)``,
``Depends(require_act)`` or ``Depends(require_scope("worker"))`` from ``deps`` and find
the engine with ``Depends(get_engine)`` or ``http_state(request)``. The dashboard comes
last because it owns ``/``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

from fastapi import APIRouter, FastAPI

from treadle.hosts.http import api, health, session
from treadle.hosts.http.auth import TokenAuth
from treadle.hosts.http.csrf import CsrfCookieMiddleware
from treadle.hosts.http.errors import install_error_handlers
from treadle.hosts.http.headers import SecurityHeadersMiddleware
from treadle.hosts.http.limits import BodyLimitMiddleware
from treadle.hosts.http.state import HttpState
from treadle.kernel.arguments import count as _count
from treadle.kernel.arguments import invalid as _invalid

if TYPE_CHECKING:
    from treadle.engine import Engine

__all__ = ["DEFAULT_MAX_BODY_BYTES", "OPTIONAL_MODULES", "create_app"]

DEFAULT_MAX_BODY_BYTES: Final = 1_048_576
"""1 MiB: request bodies above it are refused with 413."""

OPTIONAL_MODULES: Final = ("workers", "metrics", "dashboard")
"""Modules of ``treadle.hosts.http`` mounted when present, in this order (see above)."""


def create_app(
    engine: Engine,
    *,
    auth: TokenAuth | None = None,
    read_only: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    routers: Iterable[APIRouter] = (),
    title: str = "Treadle",
) -> FastAPI:
    """The HTTP app for ``engine``.

    ``auth`` is a ``TokenAuth`` (bearer tokens with scopes); ``None`` is open access,
    for a loopback-only server or an app you protect yourself. ``read_only=True``
    refuses every action (403 ``ReadOnly``) whatever the token. Request bodies above
    ``max_body_bytes`` get 413. ``routers`` are included after the JSON API.
    """
    from treadle.engine import Engine

    if not isinstance(engine, Engine):
        raise _invalid("engine", f"must be a treadle Engine, got {type(engine).__name__}")
    if auth is not None and not isinstance(auth, TokenAuth):
        raise _invalid("auth", f"must be a TokenAuth or None, got {type(auth).__name__}")
    if not isinstance(read_only, bool):
        raise _invalid("read_only", f"must be True or False, got {read_only!r}")
    limit = _count(max_body_bytes, "max_body_bytes", minimum=1, maximum=2**40)
    state = HttpState(engine=engine, auth=auth, read_only=read_only, max_body_bytes=limit)
    if auth is not None:
        state.secret = auth.session_secret

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await state.aclose()

    from treadle import __version__

    app = FastAPI(
        title=title,
        version=__version__,
        description="Treadle's HTTP API: runs, actions, live events (docs/http-api.md).",
        lifespan=lifespan,
    )
    app.state.treadle = state
    install_error_handlers(app)
    app.add_middleware(CsrfCookieMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limit)

    app.include_router(health.router)
    app.include_router(session.router)
    app.include_router(api.router)
    for router in routers:
        app.include_router(router)
    # -- optional modules: a new router module goes into OPTIONAL_MODULES ---------------
    for name in OPTIONAL_MODULES:
        _mount_optional(app, state, name)
    return app


def _mount_optional(app: FastAPI, state: HttpState, name: str) -> None:
    """Mount ``treadle.hosts.http.<name>`` if the module exists. An ImportError inside
    an existing module (a missing extra) propagates: it is a broken install, not an
    absent feature."""
    qualified = f"{__package__}.{name}"
    if importlib.util.find_spec(qualified) is None:
        return
    module = importlib.import_module(qualified)
    mount = getattr(module, "mount", None)
    if not callable(mount):
        raise TypeError(f"{qualified} must define mount(app, state)")
    mount(app, state)
