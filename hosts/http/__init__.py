"""Treadle over HTTP: ``create_app(engine, auth=..., read_only=...)`` (the ``server`` extra).

Importing this package imports FastAPI; importing ``treadle`` does not. See
docs/http-api.md, and ``app`` for how routers are put together.
"""

from treadle.hosts.http.app import create_app
from treadle.hosts.http.auth import Principal, TokenAuth
from treadle.hosts.http.csrf import csrf_token, verify_csrf
from treadle.hosts.http.deps import get_engine, require_act, require_read, require_scope
from treadle.hosts.http.state import HttpState, http_state

__all__ = [
    "HttpState",
    "Principal",
    "TokenAuth",
    "create_app",
    "csrf_token",
    "get_engine",
    "http_state",
    "require_act",
    "require_read",
    "require_scope",
    "verify_csrf",
]
