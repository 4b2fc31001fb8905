"""JSON errors: every error answer is ``{"error": {"code", "message", "field", "errors"}}``.

``code`` is Treadle's stable error code (``RunNotFoundError``, ``InvalidInputError``,
...) or an HTTP one (``Unauthorized``, ``Forbidden``, ``CsrfFailed``, ``ReadOnly``,
``PayloadTooLarge``, ``RequestValidationError``); ``field`` names the first offending
field, ``errors`` lists every ``{field, message}``. Status codes: 404 not found, 409
conflict, 422 validation, 400 an action that does not apply to the workflow, 503 a
transient storage failure, 504 an update that got no reply in time, 500
``InternalError`` for anything unexpected (its details stay in the server's log).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from treadle.kernel.errors import (
    ConflictError,
    NotFoundError,
    NotSupportedError,
    TransientStorageError,
    TreadleError,
    TreadleValidationError,
    describe_exception,
)

__all__ = ["ErrorBody", "ErrorDetail", "FieldError", "error_response", "install_error_handlers"]


class FieldError(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    errors: list[FieldError] = []


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    errors: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    listed = [FieldError(field=f, message=m) for f, m in errors or []]
    if field is None and listed:
        field = listed[0].field
    body = ErrorBody(error=ErrorDetail(code=code, message=message, field=field, errors=listed))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def status_for(exc: TreadleError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, TreadleValidationError):
        return 422
    if isinstance(exc, NotSupportedError):
        return 400
    if isinstance(exc, TransientStorageError):
        return 503
    return 500


async def _treadle_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TreadleError)
    errors = exc.errors if isinstance(exc, TreadleValidationError) else None
    status = status_for(exc)
    message = exc.message if status != 500 else describe_exception(exc)
    return error_response(status, exc.code, message, errors=errors)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
            loc = loc[1:] if len(loc) > 1 else loc
        errors.append((".".join(loc) or "<root>", str(err.get("msg", "invalid"))))
    detail = "; ".join(f"{f}: {m}" for f, m in errors)
    return error_response(
        422, "RequestValidationError", f"invalid request: {detail}", errors=errors
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code: str = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "HttpError")
    field: str | None = getattr(exc, "field", None)
    headers: dict[str, str] | None = getattr(exc, "headers", None)
    return error_response(exc.status_code, code, str(exc.detail), field=field, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug or an unexpected failure: 500 in the usual shape, without internals (the
    server logs the traceback)."""
    return error_response(500, "InternalError", "internal server error")


async def _timeout(request: Request, exc: Exception) -> JSONResponse:
    return error_response(504, "Timeout", str(exc) or "timed out")


_HTTP_CODES: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    422: "RequestValidationError",
}


def install_error_handlers(app: FastAPI) -> None:
    """Route every error this app raises to a JSON answer of ``ErrorBody`` shape."""
    handlers: dict[Any, Any] = {
        TreadleError: _treadle_error,
        RequestValidationError: _validation_error,
        StarletteHTTPException: _http_error,
        TimeoutError: _timeout,
        Exception: _unexpected,
    }
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
