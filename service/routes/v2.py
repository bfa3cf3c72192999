"""The Open Inference Protocol (KServe v2, REST), as Triton and KServe speak it, under /v2.

Health, server and model metadata, model readiness and inference for every served model
(the ensemble too), in the JSON tensor form and with Triton's binary tensor extension.
Errors are the protocol's `{"error": "<message>"}`. Inference is guarded like /predict
(API keys, rate limit) and shares its body-size, pixel and queue limits; the metadata and
health routes stay open, as /v1/models and /readyz do. No gRPC.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from service.auth import require_access
from service.model_store import Target, parse_version
from service.runtime import Runtime, RuntimeDep
from service.upload import read_body
from service.v2_codec import (
    BINARY_TYPE,
    HEADER_LENGTH,
    JSON_TYPE,
    ProtocolError,
    describe_errors,
    encode_response,
    parse_request,
)
from service.v2_inference import infer, loaded_versions, metadata, select_outputs, the_input
from service.v2_schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ProtocolErrorBody,
    ServerMetadata,
    inline_schema,
)

SERVER_NAME = "fer-service"
EXTENSIONS = ["binary_tensor_data", "classification"]


async def _protocol_answer(request: Request, error: Exception) -> Response | None:
    """The answer the rest of the API gives `error` (status, Retry-After, WWW-Authenticate:
    the app's own exception handler decides), with its detail as the protocol's
    `{"error": message}`; None for an exception the app has no handler for."""
    if isinstance(error, RequestValidationError):  # the protocol's status for a bad request
        error = ProtocolError(400, describe_errors(list(error.errors())))
    handlers = request.app.exception_handlers
    kind = next((k for k in type(error).__mro__ if k in handlers and k is not Exception), None)
    if kind is None:
        return None
    answer = await handlers[kind](request, error)
    body = json.loads(answer.body)
    headers = {key: value for key, value in answer.headers.items()
               if key not in ("content-length", "content-type")}
    return JSONResponse({"error": body.get("detail") or body.get("error")},
                        status_code=answer.status_code, headers=headers)


class ProtocolRoute(APIRoute):
    """Answers the errors of its endpoint, and of the endpoint's dependencies (API key,
    rate limit), in the protocol's form; anything unexpected goes on to the app's 500."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:
                answer = await _protocol_answer(request, error)
                if answer is None:
                    raise
                return answer

        return handle


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=ProtocolRoute)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    texts = {
        400: "Malformed request: wrong datatype or shape, unknown input or output, data "
             "that disagrees with the shape, bad JSON, a malformed version, a bad image",
        401: "API key missing or not valid (only when the server sets FER_API_KEYS)",
        404: "Unknown model or version",
        408: "The request body was not received within the time limit",
        413: "Body, crop count, image count or pixel count over the limit",
        415: "An image element that is not a JPEG, PNG, WebP or BMP; a Content-Encoding",
        429: "Rate limit reached; retry after the Retry-After header's seconds",
        500: "The model failed while running",
        503: "Overloaded, or not ready; retry after the Retry-After header's seconds",
    }
    return {status: {"model": ProtocolErrorBody, "description": texts[status]}
            for status in statuses}


def _version(text: str) -> int:
    version = parse_version(text) if len(text) <= 18 else None
    if version is None:
        raise ProtocolError(400, f"model version {text!r} is not a positive integer")
    return version


def _target(runtime: Runtime, name: str, version: str | None) -> Target:
    return runtime.resolve(name, None if version is None else _version(version))


# -- server --------------------------------------------------------------------------------
@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_class=Response, summary="Server live (200, empty body)")
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses=_errors(503),
            summary="Server ready (200, empty body)")
async def server_ready(runtime: RuntimeDep) -> Response:
    """200 once a model version is loaded and warmed up, as /readyz."""
    if not (runtime.ready and runtime.store.loaded_count()):
        raise ProtocolError(503, "no model is loaded yet" if not runtime.ready
                            else "no model version could be loaded", {"Retry-After": "1"})
    return Response(status_code=200)


# -- model metadata and readiness ----------------------------------------------------------
def _metadata(runtime: Runtime, name: str, version: str | None) -> ModelMetadata:
    target = _target(runtime, name, version)
    return metadata(target, loaded_versions(runtime, target))


@router.get("/models/{name}", response_model=ModelMetadata, responses=_errors(400, 404),
            summary="Model metadata (latest version)")
async def model_metadata(name: str, runtime: RuntimeDep) -> ModelMetadata:
    return _metadata(runtime, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata,
            responses=_errors(400, 404), summary="Model metadata")
async def model_version_metadata(name: str, version: str, runtime: RuntimeDep) -> ModelMetadata:
    return _metadata(runtime, name, version)


@router.get("/models/{name}/ready", response_class=Response, responses=_errors(400, 404),
            summary="Model ready (200, empty body)")
async def model_ready(name: str, runtime: RuntimeDep) -> Response:
    _target(runtime, name, None)
    return Response(status_code=200)


@router.get("/models/{name}/versions/{version}/ready", response_class=Response,
            responses=_errors(400, 404), summary="Model version ready (200, empty body)")
async def model_version_ready(name: str, version: str, runtime: RuntimeDep) -> Response:
    _target(runtime, name, version)
    return Response(status_code=200)


# -- inference -----------------------------------------------------------------------------
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON_TYPE: {"schema": inline_schema(InferenceRequest)},
            BINARY_TYPE: {
                "schema": {"type": "string", "format": "binary"},
                "description": f"Binary tensor extension: the JSON request ({HEADER_LENGTH} "
                               "bytes), then each binary input's bytes.",
            },
        },
    }
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": f"The outputs as JSON, or (when an output is binary) the JSON "
                       f"({HEADER_LENGTH} bytes) followed by the binary outputs.",
        "content": {BINARY_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    **_errors(400, 401, 404, 408, 413, 415, 429, 500, 503),
    "4XX": {"model": ProtocolErrorBody,
            "description": "499: the client left before its body was read"},
}
HeaderLength = Annotated[int | None, Header(
    alias=HEADER_LENGTH, ge=0,
    description="Binary tensor extension: the length of the JSON part of the body.")]


async def _infer(request: Request, runtime: Runtime, name: str, version: str | None,
                 header_length: int | None) -> Response:
    target = _target(runtime, name, version)
    runtime.pipeline.admit()  # refuse before reading the body when already full, as /predict
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported; send the "
                            "body uncompressed")
    settings = runtime.settings
    body = await read_body(request, settings.max_body_bytes, settings.upload_timeout_s)
    parsed = parse_request(body, header_length)
    tensor = the_input(parsed.request, target)
    raw = parsed.raw[0]
    tensors = await infer(runtime, target, tensor, raw)
    outputs = select_outputs(parsed.request, tensor.name, tensors)
    content, headers = encode_response(target.name, str(target.version), parsed.request.id, outputs)
    return Response(content, headers=headers)


@router.post("/models/{name}/infer", responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY,
             dependencies=[Depends(require_access)], response_class=Response,
             summary="Inference (latest version)")
async def model_infer(name: str, request: Request, runtime: RuntimeDep,
                      header_length: HeaderLength = None) -> Response:
    """Face crops (`input`, FP32 [N, 1, 48, 48]) or photos (`image`, BYTES [N]); see the
    model's metadata for its tensors."""
    return await _infer(request, runtime, name, None, header_length)


@router.post("/models/{name}/versions/{version}/infer", responses=_INFER_RESPONSES,
             openapi_extra=_INFER_BODY, dependencies=[Depends(require_access)],
             response_class=Response, summary="Inference")
async def model_version_infer(name: str, version: str, request: Request, runtime: RuntimeDep,
                              header_length: HeaderLength = None) -> Response:
    """As `/v2/models/{name}/infer`, on one version."""
    return await _infer(request, runtime, name, version, header_length)
