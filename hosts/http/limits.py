"""``BodyLimitMiddleware``: refuse request bodies larger than ``max_body_bytes`` (413).

A declared ``Content-Length`` over the limit is refused before any byte is read; a
chunked body is counted as it streams and cut off at the limit, so a client cannot
make the server buffer more than the limit whatever it declares.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimitMiddleware", "PayloadTooLarge"]


class PayloadTooLarge(HTTPException):
    """Raised into the app when a streamed body passes the limit. An ``HTTPException``
    so that FastAPI's body parsing passes it on (it turns other errors into a 400)."""

    code = "PayloadTooLarge"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


def _body(limit: int) -> bytes:
    return json.dumps(
        {
            "error": {
                "code": "PayloadTooLarge",
                "message": f"request body larger than {limit} bytes",
                "field": None,
                "errors": [],
            }
        }
    ).encode()


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.limit:
                    await _refuse(send, self.limit)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge:
            if not started:
                await _refuse(send, self.limit)


async def _refuse(send: Send, limit: int) -> None:
    body = _body(limit)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
