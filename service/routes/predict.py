"""POST /predict: an image in, every face's box and expression probabilities out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, field_validator

from service.auth import require_access
from service.imaging import SUPPORTED_FORMATS
from service.runtime import RuntimeDep
from service.schemas import ErrorResponse, PredictResponse
from service.upload import read_image_upload

router = APIRouter(tags=["predict"])

MAX_NAME_LENGTH = 64
MAX_VERSION = 1_000_000


class PredictQuery(BaseModel):
    """The query of /predict, and of /v1/stream (its `set_model` command too)."""

    model: str | None = Field(None, max_length=MAX_NAME_LENGTH,
                              description="Model name (default: the configured one).")
    version: int | None = Field(None, ge=1, le=MAX_VERSION,
                                description="Model version (default: latest).")
    detect: bool = Field(True, description="false: the whole image is one face crop.")

    @field_validator("version", mode="before")
    @classmethod
    def version_is_not_a_boolean(cls, value: object) -> object:
        if isinstance(value, bool):  # JSON `true` in a stream command is no version
            raise ValueError("Input should be a valid integer")
        return value

_IMAGE_SCHEMA = {"type": "string", "format": "binary"}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": _IMAGE_SCHEMA},
                }
            },
            **{f"image/{fmt}": {"schema": _IMAGE_SCHEMA} for fmt in SUPPORTED_FORMATS},
        },
    }
}
_ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Empty, corrupt or truncated image; malformed multipart body",
        401: "API key missing or not valid (only when the server sets FER_API_KEYS)",
        404: "Unknown model or version",
        408: "The upload was not received within the time limit",
        413: "Upload or pixel count over the limit",
        415: "Not a JPEG, PNG, WebP or BMP image",
        422: "Invalid query parameter",
        429: "Rate limit reached; retry after the Retry-After header's seconds",
        500: "The model failed while running (`inference_failed`)",
        503: "Overloaded, or the model is configured but not loaded yet (`not_ready`) or was "
             "unloaded while the request waited (`model_unloaded`); retry after the "
             "Retry-After header's seconds",
    }.items()
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=_BODY,
    dependencies=[Depends(require_access)],
    summary="Detect faces and classify their expressions",
)
async def predict(
    request: Request, runtime: RuntimeDep, query: Annotated[PredictQuery, Query()]
) -> PredictResponse:
    """Send the image as multipart/form-data (field `image`) or as the raw body."""
    target = runtime.resolve(query.model, query.version)
    runtime.pipeline.admit()  # refuse before reading the body when already full
    settings = runtime.settings
    data = await read_image_upload(request, settings.max_body_bytes, settings.upload_timeout_s)
    return await runtime.pipeline.predict(data, target, query.detect)
