"""``HttpState``: what every route of one app shares (``request.app.state.treadle``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import Request

    from treadle.engine import Engine
    from treadle.hosts.http.auth import TokenAuth

__all__ = ["HttpState", "http_state"]


@dataclass
class HttpState:
    """The engine the app serves, its auth (``None``: open access), whether it refuses
    every action (``read_only``), the request body limit and the shared event hub.

    Routers added by other modules read it with ``http_state(request)``; ``extras`` is a
    place for their own per-app objects (keyed by module name)."""

    engine: Engine
    auth: TokenAuth | None
    read_only: bool = False
    max_body_bytes: int = 1_048_576
    secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    hub: Any = None
    """The shared event listener behind the SSE streams (``events.EventHub``), started
    on first use."""
    extras: dict[str, Any] = field(default_factory=dict)

    async def aclose(self) -> None:
        """Stop the event hub's listener (the engine is the caller's to close)."""
        if self.hub is not None:
            await self.hub.aclose()


def http_state(request: Request) -> HttpState:
    """The ``HttpState`` of the app serving ``request`` (also when mounted in another app)."""
    found: HttpState = request.app.state.treadle
    return found
