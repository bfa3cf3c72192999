"""What a client is told when something goes wrong, decided in one place.

As Starlette's `HTTPException` carries its status, every error a client can be told
about carries its HTTP status, its error `code` and, where the client should retry,
`retry_after_s` (`ServiceError`; `ImageError` carries the same). `problem()` turns any
exception into a `Problem`: /predict answers it as JSON `{error, detail}` with that
status (plus `Retry-After`), /v1/stream as an error message, or a close code when it
refuses the connection. An exception that is none of these is a 500 / 1011, logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.imaging import ImageError

log = logging.getLogger("service.errors")

# WebSocket close codes (RFC 6455, 7.4.1)
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013

INTERNAL_DETAIL = "internal error; see the server log"


def close_code_for(status: int) -> int:
    """The WebSocket close code that means what an HTTP status means."""
    if status in (429, 503):
        return TRY_AGAIN_LATER
    return INTERNAL_ERROR if status >= 500 else POLICY_VIOLATION


class ServiceError(Exception):
    """An error the client is told about: HTTP `status`, error `code`, optional Retry-After."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str, *, retry_after_s: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(retry_after_s)

    @property
    def close_code(self) -> int:
        return close_code_for(self.status)


class ClientError(ServiceError):
    """A ServiceError whose status and code are given where it is raised."""

    def __init__(self, status: int, code: str, detail: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, headers=headers)
        self.status, self.code = status, code


class Overloaded(ServiceError):
    """The service cannot take this work now; the client should retry later (503 +
    Retry-After; a stream: 1013)."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


@dataclass(frozen=True)
class Problem:
    status: int
    code: str
    detail: str
    retry_after_s: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def close_code(self) -> int:
        return close_code_for(self.status)

    def body(self) -> dict[str, Any]:
        """The JSON of a stream's error message (an HTTP answer has no `retry_after_s`)."""
        extra = {} if self.retry_after_s is None else {"retry_after_s": self.retry_after_s}
        return {"error": self.code, "detail": self.detail, **extra}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.detail, self.headers or None)


def problem(error: BaseException) -> Problem:
    """The one mapping from an exception to what the client is told."""
    if isinstance(error, ServiceError):
        return Problem(error.status, error.code, error.detail, error.retry_after_s, error.headers)
    if isinstance(error, ImageError):
        return Problem(error.status, error.code, error.message)
    if isinstance(error, (RequestValidationError, ValidationError)):
        return Problem(422, "invalid_request", validation_detail(error.errors()))
    if isinstance(error, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return Problem(error.status_code, code, str(error.detail),
                       headers=dict(error.headers or {}))
    return Problem(500, "internal_error", INTERNAL_DETAIL)


def error_response(status: int, code: str, detail: str,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def validation_detail(errors: Any) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Known errors become their Problem. Anything else is answered (500, logged with the
    request id) by `RequestContextMiddleware`, inside the request's context."""

    async def answer(_: Request, exc: Exception) -> JSONResponse:
        return problem(exc).response()

    for kind in (ServiceError, ImageError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(kind, answer)
