"""Every error a client can cause becomes a JSON `{error, detail}` with a 4xx status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import InferenceError, Overloaded
from service.imaging import ImageError
from service.model_store import UnknownModel, UnknownVersion

log = logging.getLogger("service.errors")


class ClientError(Exception):
    def __init__(self, status: int, code: str, detail: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_response(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientError)
    async def client_error(_: Request, exc: ClientError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.detail, headers=exc.headers)

    @app.exception_handler(ImageError)
    async def image_error(_: Request, exc: ImageError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(UnknownModel)
    async def unknown_model(_: Request, exc: UnknownModel) -> JSONResponse:
        return error_response(404, "unknown_model", str(exc))

    @app.exception_handler(UnknownVersion)
    async def unknown_version(_: Request, exc: UnknownVersion) -> JSONResponse:
        return error_response(404, "unknown_version", str(exc))

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return error_response(503, "overloaded", str(exc),
                              headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(InferenceError)
    async def inference_failed(_: Request, exc: InferenceError) -> JSONResponse:
        return error_response(500, "inference_failed", f"the model failed: {exc}")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the server log")
